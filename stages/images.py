"""Image decoding and the ADM center crop: encoded image bytes in, a fixed-size RGB crop out.

:func:`decode_and_crop` never raises on bad data: every input gets a :class:`DecodeResult` whose
``status`` is ``"ok"``, ``"converted"`` (usable, with the reason for the change) or ``"skipped"``
(with the reason). Listing a dataset and reading its files is the pipeline's job
(:mod:`repa_cache.pipeline.source`).
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from repa_cache.cache.errors import one_line

#: Largest image (width * height) that is decoded; larger ones are skipped from their header.
DEFAULT_MAX_PIXELS = 2**28
#: Largest image (width * height) the ADM resize may produce (the short side becomes the
#: resolution, so a very thin image is scaled up along its long side too): 2**26 pixels is 192 MiB
#: of RGB, an aspect ratio of 1024:1 at 256 px and 4:1 at 4096 px. Larger ones are skipped from
#: their header, before any pixel is decoded.
DEFAULT_MAX_RESIZED_PIXELS = 2**26

_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_MAX_REASON_CHARS = 160  # longest library error message quoted in a manifest reason


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
    if image.mode.startswith("I;16") or (image.mode == "I" and vmin >= 0 and vmax <= 65535):
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


def adm_resize_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The size :func:`center_crop_adm` resizes a ``width x height`` image to before cutting out
    the crop (same arithmetic: BOX halving while the short side is at least twice the resolution,
    then the short side scaled to the resolution, sides rounded). Allocates nothing."""
    while min(width, height) >= 2 * resolution:
        width, height = width // 2, height // 2
    scale = resolution / min(width, height)
    return round(width * scale), round(height * scale)


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
    new_size = adm_resize_size(image.size[0], image.size[1], resolution)
    image = image.resize(new_size, resample=Image.Resampling.BICUBIC)
    array = np.asarray(image)  # (H, W, 3)
    top = (array.shape[0] - resolution) // 2
    left = (array.shape[1] - resolution) // 2
    crop = array[top : top + resolution, left : left + resolution]  # (res, res, 3)
    return np.ascontiguousarray(crop, dtype=np.uint8)


def _skipped(reason: str, width: int = 0, height: int = 0) -> DecodeResult:
    return DecodeResult(image=None, status="skipped", reason=reason, width=width, height=height)


def decode_and_crop(
    data: bytes,
    resolution: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_resized_pixels: int = DEFAULT_MAX_RESIZED_PIXELS,
) -> DecodeResult:
    """Decode encoded image bytes and center-crop them with :func:`center_crop_adm`.

    Never raises for bad data. Outcomes:

    * ``skipped`` ``"empty file"``: zero bytes;
    * ``skipped`` ``"not an image"``: PIL cannot identify the format;
    * ``skipped`` ``"too large: {w}x{h} pixels"``: ``w * h > max_pixels``, decided from the header
      before any pixel is decoded (PIL's own decompression-bomb limit does not pre-empt this);
    * ``skipped`` ``"extreme aspect ratio: {w}x{h} would be resized to {W}x{H} pixels"``: the ADM
      resize (:func:`adm_resize_size`) would make more than ``max_resized_pixels`` pixels (a
      1x100000 image at 256 px would become 256x25600000); decided from the header too;
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
        ValueError: ``resolution``, ``max_pixels`` or ``max_resized_pixels`` is not positive (a
            caller error, not bad data).
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if max_resized_pixels <= 0:
        raise ValueError(f"max_resized_pixels must be positive, got {max_resized_pixels}")
    if len(data) == 0:
        return _skipped("empty file")
    try:
        with _pil_pixel_limit_lifted():
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return _skipped("not an image")
    except Exception as exc:  # noqa: BLE001 - any header failure is an outcome, not a crash
        return _skipped(f"corrupt or truncated image: {one_line(exc, _MAX_REASON_CHARS)}")

    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            return _skipped(f"corrupt or truncated image: size {width}x{height}", width, height)
        if width * height > max_pixels:
            return _skipped(f"too large: {width}x{height} pixels", width, height)
        resized = adm_resize_size(width, height, resolution)
        if resized[0] * resized[1] > max_resized_pixels:
            return _skipped(
                f"extreme aspect ratio: {width}x{height} would be resized to {resized[0]}x{resized[1]} pixels", width, height
            )
        try:
            image.load()
        except Image.DecompressionBombError:
            return _skipped(f"too large: {width}x{height} pixels", width, height)
        except Exception as exc:  # noqa: BLE001
            return _skipped(f"corrupt or truncated image: {one_line(exc, _MAX_REASON_CHARS)}", width, height)

        reasons: list[str] = []
        try:
            rgb, mode_reason = _to_rgb(image)
        except Exception as exc:  # noqa: BLE001
            return _skipped(
                f"unsupported image mode {image.mode}: {one_line(exc, _MAX_REASON_CHARS)}", width, height
            )
        if mode_reason:
            reasons.append(mode_reason)
        if min(width, height) < resolution:
            reasons.append(f"upscaled from {width}x{height}")
        try:
            crop = center_crop_adm(rgb, resolution)  # (res, res, 3)
        except Exception as exc:  # noqa: BLE001
            return _skipped(f"corrupt or truncated image: {one_line(exc, _MAX_REASON_CHARS)}", width, height)

    return DecodeResult(
        image=crop,
        status="converted" if reasons else "ok",
        reason="; ".join(reasons),
        width=width,
        height=height,
    )
