"""The source dataset: list it once, then read each item's encoded bytes.

:func:`list_source` walks a dataset folder without decoding any pixels and returns a stable,
hashable :class:`SourceListing` (its fingerprint is part of every cache's fingerprint). A worker
later reads the bytes of its items with :func:`read_bytes` and hands them to
:func:`repa_cache.stages.images.decode_and_crop`.

Three layouts are understood:

* an **image folder** (torchvision ``ImageFolder`` layout): one sub-folder per class, files found
  recursively below each class folder;
* a **flat folder**: image files and no sub-folder, for unconditional training. It is one class,
  named :data:`FLAT_CLASS_NAME` (a fixed name rather than the folder's, so that a moved or renamed
  dataset keeps its fingerprint), and its listing's kind is ``"flat"``, which the cache records in
  its source description. With one class, classifier-free guidance has nothing to guide towards:
  sample such a model with ``--cfg 1``;
* **webdataset shards**: ``*.tar`` files at the top level of the folder, each sample made of an
  image member (``jpg``, ``jpeg``, ``png`` or ``webp``) and a ``cls`` member holding the integer
  label as text.

Limits (every number read from a file is bounded before anything is allocated from it):

* a ``cls`` member is read only up to :data:`MAX_LABEL_BYTES` bytes; a longer one is not a label;
* a label must be below :data:`MAX_CLASSES` (the class table has ``max label + 1`` entries);
* a sample key repeated inside one tar (a second member with a key and extension already seen)
  is a webdataset key collision: only the first sample is listed.

A webdataset sample that breaks one of these rules (or has no image or no label) is not listed;
the listing counts such samples by reason, logs one warning per reason with its count, and reports
the counts in :meth:`SourceListing.describe` (``"unlisted"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from repa_cache.cache.errors import UsageError, one_line

logger = logging.getLogger(__name__)

#: Image member extensions of a webdataset sample, in order of preference.
WDS_IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
#: Extension of the member that holds a webdataset sample's integer label.
WDS_LABEL_EXTENSION = "cls"

#: Labels must be below this (the class table of a webdataset listing has ``max label + 1`` names).
MAX_CLASSES = 100_000
#: Longest ``cls`` member that is read (a label below MAX_CLASSES is 5 digits; whitespace allowed).
MAX_LABEL_BYTES = 64

_MAX_ERROR_CHARS = 160

#: The one class of a flat folder (kind ``"flat"``).
FLAT_CLASS_NAME = "unconditional"

#: Reasons a webdataset sample is not listed (keys of ``SourceListing.unlisted``).
UNLISTED_INCOMPLETE = "no image or no valid label"
UNLISTED_LABEL_TOO_LARGE = f"label not below {MAX_CLASSES}"
UNLISTED_DUPLICATE = "duplicate key"


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
        kind: ``"imagefolder"``, ``"flat"`` (one class, :data:`FLAT_CLASS_NAME`) or ``"webdataset"``.
        root: The dataset folder (absolute).
        class_names: Class name of each label index.
        items: The samples, in listing order.
        unlisted: Webdataset samples that were found but not listed: ``(reason, count)`` pairs,
            only for reasons with a non-zero count.
    """

    kind: str
    root: str
    class_names: tuple[str, ...]
    items: tuple[SourceItem, ...]
    unlisted: tuple[tuple[str, int], ...] = ()

    def describe(self) -> dict[str, object]:
        """A short, JSON-friendly description of the source for the cache metadata (with
        ``"unlisted"``: reason -> count, for a webdataset listing)."""
        out: dict[str, object] = {
            "kind": self.kind,
            "root": self.root,
            "num_items": len(self.items),
            "num_classes": len(self.class_names),
        }
        if self.kind == "webdataset":
            out["unlisted"] = dict(self.unlisted)
        return out

    def fingerprint(self) -> str:
        """A sha256 hex digest of the listing's content.

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
    with a reason, when decoded). A folder without non-hidden sub-folders is a flat folder: its
    regular non-hidden files are the items of one class, :data:`FLAT_CLASS_NAME`. Items are
    sorted by their relative posix path.

    Raises:
        UsageError: the folder does not exist, is a file, or holds no items.
    """
    path = Path(root)
    if not path.exists():
        raise UsageError(f"data folder {root} does not exist")
    if not path.is_dir():
        raise UsageError(
            f"data folder {root} is a file; pass the folder that holds the images (flat, or one sub-folder per class) "
            "or the .tar shards"
        )
    abs_root = path.resolve()
    tars = sorted(
        entry.name
        for entry in os.scandir(abs_root)
        if entry.name.endswith(".tar") and not _is_hidden(entry.name) and entry.is_file()
    )
    listing = _list_webdataset(abs_root, tars) if tars else _list_imagefolder(abs_root)
    if not listing.items:
        raise UsageError(
            f"no images found in {root} (expected image files, one sub-folder per class, or webdataset "
            ".tar shards)"
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
    """List a torchvision-style image folder (one sub-folder per class), or a flat folder."""
    class_names = sorted(
        entry.name for entry in os.scandir(root) if entry.is_dir() and not _is_hidden(entry.name)
    )
    if not class_names:
        return _list_flat(root)
    items: list[SourceItem] = []
    for label, class_name in enumerate(class_names):
        for dirpath, dirnames, filenames in os.walk(root / class_name):
            # Prune hidden folders in place so that os.walk does not descend into them.
            dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
            for filename in filenames:
                if _is_hidden(filename):
                    continue
                full = os.path.join(dirpath, filename)
                if not os.path.isfile(full):  # broken links, sockets, fifos
                    continue
                key = Path(os.path.relpath(full, root)).as_posix()
                items.append(SourceItem(key=key, label=label, path=full, size=os.path.getsize(full)))
    items.sort(key=lambda item: item.key)
    return SourceListing(kind="imagefolder", root=str(root), class_names=tuple(class_names), items=tuple(items))


def _list_flat(root: Path) -> SourceListing:
    """List a folder of image files without sub-folders as one class (unconditional training)."""
    items = [
        SourceItem(key=entry.name, label=0, path=entry.path, size=entry.stat().st_size)
        for entry in os.scandir(root)
        if not _is_hidden(entry.name) and entry.is_file()  # follows links; broken ones are not files
    ]
    items.sort(key=lambda item: item.key)
    return SourceListing(kind="flat", root=str(root), class_names=(FLAT_CLASS_NAME,), items=tuple(items))


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
    unlisted = {UNLISTED_INCOMPLETE: 0, UNLISTED_LABEL_TOO_LARGE: 0, UNLISTED_DUPLICATE: 0}
    for tar_name in tar_names:
        tar_path = root / tar_name
        # sample key -> extension -> member, keys in order of first appearance
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        repeats: dict[str, dict[str, int]] = {}  # key -> extension -> later members with that name
        try:
            with tarfile.open(tar_path, mode="r:") as tar:
                for member in tar:
                    if not member.isfile() or member.issparse():
                        continue
                    if _is_hidden(member.name.rpartition("/")[2]):
                        continue
                    key, ext = _split_wds_name(member.name)
                    members = samples.setdefault(key, {})
                    if ext.lower() in members:
                        counts = repeats.setdefault(key, {})
                        counts[ext.lower()] = counts.get(ext.lower(), 0) + 1
                        continue
                    members[ext.lower()] = member
                labels = {key: _read_wds_label(tar, members.get(WDS_LABEL_EXTENSION)) for key, members in samples.items()}
        except (tarfile.TarError, OSError) as exc:
            raise UsageError(f"cannot read tar shard {tar_path}: {one_line(exc, _MAX_ERROR_CHARS)}") from exc
        # A repeated key is a second sample under the same name: only the first one is listed.
        unlisted[UNLISTED_DUPLICATE] += sum(max(counts.values()) for counts in repeats.values())
        for key, members in samples.items():
            image = next((members[e] for e in WDS_IMAGE_EXTENSIONS if e in members), None)
            label = labels[key]
            if image is None or label is None:
                unlisted[UNLISTED_INCOMPLETE] += 1
                continue
            if label >= MAX_CLASSES:
                unlisted[UNLISTED_LABEL_TOO_LARGE] += 1
                continue
            max_label = max(max_label, label)
            items.append(
                SourceItem(key=f"{tar_name}/{key}", label=label, path=str(tar_path), offset=image.offset_data, size=image.size)
            )
    if unlisted[UNLISTED_INCOMPLETE]:
        logger.warning(
            "%d webdataset samples in %s have no image member (%s) or no valid %s label; they are not listed",
            unlisted[UNLISTED_INCOMPLETE],
            root,
            "/".join(WDS_IMAGE_EXTENSIONS),
            WDS_LABEL_EXTENSION,
        )
    if unlisted[UNLISTED_LABEL_TOO_LARGE]:
        logger.warning(
            "%d webdataset samples in %s have a label of %d or more (at most %d classes); they are not listed",
            unlisted[UNLISTED_LABEL_TOO_LARGE],
            root,
            MAX_CLASSES,
            MAX_CLASSES,
        )
    if unlisted[UNLISTED_DUPLICATE]:
        logger.warning(
            "%d webdataset samples in %s repeat a key already seen in their tar shard; only the first "
            "sample of each key is listed",
            unlisted[UNLISTED_DUPLICATE],
            root,
        )
    return SourceListing(
        kind="webdataset",
        root=str(root),
        class_names=tuple(str(i) for i in range(max_label + 1)),
        items=tuple(items),
        unlisted=tuple((reason, n) for reason, n in unlisted.items() if n),
    )


def _read_wds_label(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> int | None:
    """A ``cls`` member as a non-negative integer; ``None`` when absent, longer than
    :data:`MAX_LABEL_BYTES` (not read) or not such an integer."""
    if member is None or member.size > MAX_LABEL_BYTES:
        return None
    handle = tar.extractfile(member)
    if handle is None:
        return None
    text = handle.read(MAX_LABEL_BYTES + 1).decode("utf-8", errors="replace").strip()
    if not text.isascii() or not text.isdigit():
        return None
    return int(text)


def read_bytes(item: SourceItem) -> bytes:
    """The encoded bytes of one item (a whole file, or its slice of a tar shard).

    A tar shard that is shorter than the listing says yields short bytes, which
    :func:`~repa_cache.stages.images.decode_and_crop` reports as a truncated image.

    Raises:
        OSError: the file cannot be opened or read.
    """
    with open(item.path, "rb") as handle:
        if item.offset < 0:
            return handle.read()
        handle.seek(item.offset)
        return handle.read(item.size)


__all__ = [
    "FLAT_CLASS_NAME", "MAX_CLASSES", "MAX_LABEL_BYTES", "WDS_IMAGE_EXTENSIONS", "WDS_LABEL_EXTENSION", "SourceItem", "SourceListing", "list_source",
    "read_bytes",
]
