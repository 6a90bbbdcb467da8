"""Source listing, image decoding and the ADM center crop.

Stage one reads a dataset in two steps: :func:`list_source` walks the dataset once, without decoding
any pixels, and returns a stable, hashable listing; later, each worker reads its items with
:func:`read_bytes` and turns them into fixed-size RGB crops with :func:`decode_and_crop`.

Two source layouts are understood:

* an **image folder** (torchvision ``ImageFolder`` layout): one sub-folder per class, files found
  recursively below each class folder;
* **webdataset shards**: ``*.tar`` files at the top level of the folder, each sample made of an
  image member (``jpg``, ``jpeg``, ``png`` or ``webp``) and a ``cls`` member holding the integer
  label as text.

Decoding never raises on bad data: every input gets a :class:`DecodeResult` whose ``status`` is
``"ok"``, ``"converted"`` (usable, with the reason for the change) or ``"skipped"`` (with the
reason).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cache.errors import UsageError

logger = logging.getLogger(__name__)

#: Image member extensions of a webdataset sample, in order of preference.
WDS_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: Extension of the member that holds a webdataset sample's integer label.
WDS_LABEL_EXTENSION = "cls"

#: Largest image (width * height) that is decoded; larger ones are skipped from their header.
DEFAULT_MAX_PIXELS = 2**28

_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_MAX_REASON_CHARS = 160


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceItem:
    """One sample of the source dataset.

    Attributes:
        key: Stable name of the sample: the relative posix path for an image folder,
            ``"<tar file name>/<sample key>"`` for webdataset shards.
        label: Class index.
        path: File to read: the image file itself, or the tar shard that holds it.
        offset: Byte offset of the image data inside the tar shard; ``-1`` for a plain file.
        size: Size of the image data in bytes.
    """

    key: str
    label: int
    path: str
    offset: int = -1
    size: int = 0


@dataclass(frozen=True)
class SourceListing:
    """The ordered list of samples of a dataset, with its class names.

    Attributes:
        kind: ``"imagefolder"`` or ``"webdataset"``.
        root: The dataset folder (absolute).
        class_names: Class name of each label index.
        items: The samples, in listing order.
    """

    kind: str
    root: str
    class_names: tuple[str, ...]
    items: tuple[SourceItem, ...]

    def describe(self) -> dict[str, object]:
        """Return a short, JSON-friendly description of the source for cache metadata."""
        return {
            "kind": self.kind,
            "root": self.root,
            "num_items": len(self.items),
            "num_classes": len(self.class_names),
        }

    def fingerprint(self) -> str:
        """Return a sha256 hex digest of the listing's content.

        The digest covers the kind, the class names and each item's key, label and size, in
        order. It leaves out the root path and file times, so a dataset that is moved or copied
        keeps its fingerprint.
        """
        digest = hashlib.sha256()
        header = {"kind": self.kind, "class_names": list(self.class_names)}
        digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
        digest.update(b"\n")
        for item in self.items:
            digest.update(json.dumps([item.key, item.label, item.size]).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def list_source(root: str | os.PathLike[str]) -> SourceListing:
    """List a dataset folder without decoding any image.

    A folder holding ``*.tar`` files at its top level is read as webdataset shards (tar files in
    sorted name order, samples in the order they appear in each tar). Otherwise the folder is read
    as an image folder: classes are the sorted non-hidden sub-folder names, and every regular
    non-hidden file below a class folder is an item (non-image files included: they are skipped,
    with a reason, when decoded). Image-folder items are sorted by their relative posix path.

    Raises:
        UsageError: the folder does not exist, is a file, or holds no items.
    """
    path = Path(root)
    if not path.exists():
        raise UsageError(f"data folder {root} does not exist")
    if not path.is_dir():
        raise UsageError(
            f"data folder {root} is a file; pass the folder that holds one sub-folder per class "
            "or the .tar shards"
        )
    abs_root = path.resolve()
    tars = sorted(
        entry.name
        for entry in os.scandir(abs_root)
        if entry.name.endswith(".tar") and not _is_hidden(entry.name) and entry.is_file()
    )
    if tars:
        listing = _list_webdataset(abs_root, tars)
    else:
        listing = _list_imagefolder(abs_root)
    if not listing.items:
        raise UsageError(
            f"no images found in {root} (expected one sub-folder per class, or webdataset .tar "
            "shards)"
        )
    logger.info(
        "listed %d items in %d classes from %s (%s)",
        len(listing.items),
        len(listing.class_names),
        listing.root,
        listing.kind,
    )
    return listing


def _list_imagefolder(root: Path) -> SourceListing:
    """List a torchvision-style image folder (one sub-folder per class)."""
    class_names = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not _is_hidden(entry.name)
    )
    items: list[SourceItem] = []
    for label, class_name in enumerate(class_names):
        class_dir = root / class_name
        for dirpath, dirnames, filenames in os.walk(class_dir):
            # Prune hidden folders in place so that os.walk does not descend into them.
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            for filename in filenames:
                if _is_hidden(filename):
                    continue
                full = os.path.join(dirpath, filename)
                if not os.path.isfile(full):  # broken links, sockets, fifos
                    continue
                key = Path(os.path.relpath(full, root)).as_posix()
                items.append(
                    SourceItem(key=key, label=label, path=full, size=os.path.getsize(full))
                )
    items.sort(key=lambda item: item.key)
    return SourceListing(
        kind="imagefolder",
        root=str(root),
        class_names=tuple(class_names),
        items=tuple(items),
    )


def _split_wds_name(name: str) -> tuple[str, str]:
    """Split a tar member name into (sample key, extension) the webdataset way.

    The key is the member path up to the first dot of its base name; the extension is the rest.
    """
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext if dot else ""


def _list_webdataset(root: Path, tar_names: list[str]) -> SourceListing:
    """List webdataset ``.tar`` shards by reading their headers (no image is decoded)."""
    items: list[SourceItem] = []
    max_label = -1
    dropped = 0
    for tar_name in tar_names:
        tar_path = root / tar_name
        # One sample: extension -> member, in first-appearance order of the keys.
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(tar_path, mode="r:") as tar:
                for member in tar:
                    if not member.isfile() or member.issparse():
                        continue
                    if _is_hidden(member.name.rpartition("/")[2]):
                        continue
                    key, ext = _split_wds_name(member.name)
                    samples.setdefault(key, {}).setdefault(ext.lower(), member)
                labels = {
                    key: _read_wds_label(tar, members.get(WDS_LABEL_EXTENSION))
                    for key, members in samples.items()
                }
        except (tarfile.TarError, OSError) as exc:
            raise UsageError(f"cannot read tar shard {tar_path}: {_short_error(exc)}") from exc
        for key, members in samples.items():
            image = next((members[e] for e in WDS_IMAGE_EXTENSIONS if e in members), None)
            label = labels[key]
            if image is None or label is None:
                dropped += 1
                continue
            max_label = max(max_label, label)
            items.append(
                SourceItem(
                    key=f"{tar_name}/{key}",
                    label=label,
                    path=str(tar_path),
                    offset=image.offset_data,
                    size=image.size,
                )
            )
    if dropped:
        logger.warning(
            "%d webdataset samples in %s have no image member (%s) or no valid %s label; "
            "they are not listed",
            dropped,
            root,
            "/".join(WDS_IMAGE_EXTENSIONS),
            WDS_LABEL_EXTENSION,
        )
    return SourceListing(
        kind="webdataset",
        root=str(root),
        class_names=tuple(str(i) for i in range(max_label + 1)),
        items=tuple(items),
    )


def _read_wds_label(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> int | None:
    """Read a ``cls`` member as a non-negative integer; ``None`` when absent or not an integer."""
    if member is None:
        return None
    handle = tar.extractfile(member)
    if handle is None:
        return None
    text = handle.read().decode("utf-8", errors="replace").strip()
    try:
        label = int(text)
    except ValueError:
        return None
    return label if label >= 0 else None


def read_bytes(item: SourceItem) -> bytes:
    """Return the encoded bytes of one item (a whole file, or its slice of a tar shard).

    A tar shard that is shorter than the listing says yields short bytes, which
    :func:`decode_and_crop` reports as a truncated image.

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(item.path, "rb") as handle:
        if item.offset < 0:
            return handle.read()
        handle.seek(item.offset)
        return handle.read(item.size)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@dataclass
class DecodeResult:
    """Outcome of decoding one item.

    Attributes:
        image: The center crop, uint8 ``(res, res, 3)``; ``None`` when skipped.
        status: ``"ok"``, ``"converted"`` or ``"skipped"``.
        reason: Why the image was converted or skipped (several reasons joined by ``"; "``);
            empty for ``"ok"``.
        width: Original width in pixels (0 when unknown).
        height: Original height in pixels (0 when unknown).
    """

    image: np.ndarray | None  # (res, res, 3) uint8
    status: str
    reason: str
    width: int
    height: int


def _short_error(exc: BaseException) -> str:
    """First line of an exception's message, bounded in length (the type name if it is empty)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if len(line) > _MAX_REASON_CHARS:
        line = line[: _MAX_REASON_CHARS - 3] + "..."
    return line


# PIL refuses (or warns about) big images inside Image.open, from a module-wide limit, before we
# can compare the header size with our own `max_pixels`. The limit is lifted only while at least
# one Image.open of ours is running (counted, so that concurrent threads do not restore it under
# each other) and restored to the caller's value afterwards.
_pixel_limit_lock = threading.Lock()
_pixel_limit_users = 0
_pixel_limit_saved: int | None = None


@contextlib.contextmanager
def _pil_pixel_limit_lifted() -> Iterator[None]:
    global _pixel_limit_users, _pixel_limit_saved
    with _pixel_limit_lock:
        if _pixel_limit_users == 0:
            _pixel_limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _pixel_limit_users += 1
    try:
        yield
    finally:
        with _pixel_limit_lock:
            _pixel_limit_users -= 1
            if _pixel_limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _pixel_limit_saved


def _scale_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto ``[0, 255]`` with rounding (a flat image maps to 0)."""
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = np.rint((values - lo) * (255.0 / (hi - lo)))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float single-channel image to 8-bit ``L``.

    * ``I;16*``: the full 16-bit range maps to 8 bits (``round(v / 257)``).
    * ``I``: values inside ``[0, 65535]`` are treated as 16-bit data as above; otherwise the
      image's own min..max range is stretched to 0..255.
    * ``F``: values inside ``[0, 1]`` map to 0..255; otherwise min..max is stretched. Non-finite
      values become 0.
    """
    # float32 is exact for 16-bit values and keeps a 2**28-pixel image near 1 GiB.
    values = np.asarray(image).astype(np.float32)  # (H, W)
    finite = np.isfinite(values)
    values = np.where(finite, values, np.float32(0.0))
    vmin = float(values.min()) if values.size else 0.0
    vmax = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    elif image.mode == "I" and vmin >= 0 and vmax <= 65535:
        lo, hi = 0.0, 65535.0
    elif image.mode == "F" and vmin >= 0 and vmax <= 1:
        lo, hi = 0.0, 1.0
    else:
        lo, hi = vmin, vmax
    return Image.fromarray(_scale_to_uint8(values, lo, hi), mode="L")


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """Convert a loaded image to ``RGB``; return it with a reason (empty when it was RGB already).

    Alpha (and palette or grey transparency) is composited over white. High bit-depth images are
    scaled to 8 bits rather than clipped.

    Raises:
        ValueError: PIL has no conversion from this mode to RGB.
    """
    mode = image.mode
    if mode == "RGB":
        return image, ""
    reason = f"mode {mode} converted to RGB"
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(image).convert("RGB"), reason
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), reason
    return image.convert("RGB"), reason


def center_crop_adm(image: Image.Image, resolution: int) -> np.ndarray:
    """Center-crop an RGB image to ``resolution`` square with the ADM / DiT / REPA rule.

    While the short side is at least twice the resolution the image is halved with a BOX filter
    (integer division of both sides); then it is resized with BICUBIC so that its short side equals
    the resolution (sides rounded), and the central ``resolution x resolution`` block is cut out
    (offsets rounded down). Images smaller than the resolution are upsampled by the same bicubic
    step.

    Returns:
        uint8 array ``(resolution, resolution, 3)``.

    Raises:
        ValueError: the image is not RGB or the resolution is not positive.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if image.mode != "RGB":
        raise ValueError(f"center_crop_adm needs an RGB image, got mode {image.mode}")
    while min(image.size) >= 2 * resolution:
        half = (image.size[0] // 2, image.size[1] // 2)
        image = image.resize(half, resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    new_size = (round(image.size[0] * scale), round(image.size[1] * scale))
    image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)  # (H, W, 3)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    crop = array[top : top + resolution, left : left + resolution]  # (res, res, 3)
    return np.ascontiguousarray(crop, dtype=np.uint8)


def _skipped(reason: str, width: int = 0, height: int = 0) -> DecodeResult:
    return DecodeResult(image=None, status="skipped", reason=reason, width=width, height=height)


def decode_and_crop(
    data: bytes, resolution: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodeResult:
    """Decode encoded image bytes and center-crop them with :func:`center_crop_adm`.

    Never raises for bad data. Outcomes:

    * ``skipped`` ``"empty file"``: zero bytes;
    * ``skipped`` ``"not an image"``: PIL cannot identify the format;
    * ``skipped`` ``"too large: {w}x{h} pixels"``: ``w * h > max_pixels``, decided from the header
      before any pixel is decoded (PIL's own decompression-bomb limit does not pre-empt this);
    * ``skipped`` ``"corrupt or truncated image: <error>"``: loading the pixels failed (truncated
      data is not padded: PIL's ``LOAD_TRUNCATED_IMAGES`` stays off);
    * ``skipped`` ``"unsupported image mode <mode>: <error>"``: PIL cannot convert it to RGB;
    * ``converted`` ``"mode <mode> converted to RGB"``: any non-RGB mode (alpha composited over
      white; 16-bit and 32-bit integer images scaled to 8 bits, not clipped);
    * ``converted`` ``"upscaled from {w}x{h}"``: the short side is below the resolution;
    * ``ok`` with an empty reason otherwise.

    Several conversion reasons are joined with ``"; "``. The EXIF orientation tag is ignored, as in
    the usual ImageNet pipelines: pixels are used in stored order. Animated images use their first
    frame.

    Raises:
        ValueError: ``resolution`` or ``max_pixels`` is not positive (a caller error, not bad data).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if len(data) == 0:
        return _skipped("empty file")
    try:
        with _pil_pixel_limit_lifted():
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _skipped("not an image")
    except Exception as exc:  # noqa: BLE001 - any header failure is an outcome, not a crash
        return _skipped(f"corrupt or truncated image: {_short_error(exc)}")

    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            return _skipped(f"corrupt or truncated image: size {width}x{height}", width, height)
        if width * height > max_pixels:
            return _skipped(f"too large: {width}x{height} pixels", width, height)
        try:
            image.load()
        except Image.DecompressionBombError:
            return _skipped(f"too large: {width}x{height} pixels", width, height)
        except Exception as exc:  # noqa: BLE001
            return _skipped(f"corrupt or truncated image: {_short_error(exc)}", width, height)

        reasons: list[str] = []
        try:
            rgb, mode_reason = _to_rgb(image)
        except Exception as exc:  # noqa: BLE001
            return _skipped(
                f"unsupported image mode {image.mode}: {_short_error(exc)}", width, height
            )
        if mode_reason:
            reasons.append(mode_reason)
        if min(width, height) < resolution:
            reasons.append(f"upscaled from {width}x{height}")
        try:
            crop = center_crop_adm(rgb, resolution)  # (res, res, 3)
        except Exception as exc:  # noqa: BLE001
            return _skipped(f"corrupt or truncated image: {_short_error(exc)}", width, height)

    return DecodeResult(
        image=crop,
        status="converted" if reasons else "ok",
        reason="; ".join(reasons),
        width=width,
        height=height,
    )
