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
import operator
import os
import tarfile
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any, overload

import numpy as np

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


@dataclass(frozen=True, slots=True)
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


def _derived_path(root: str, key: str, offset: int) -> str:
    """The file of an item listed below ``root``: ``root/key`` for a file, ``root/<tar file>``
    (the key's first part) for a webdataset sample."""
    return os.path.join(root, key if offset < 0 else key.partition("/")[0])


class ItemTable(Sequence[SourceItem]):
    """The items of a listing, one array per field, in listing order.

    A listing of ImageNet holds 1.28 M items; held as objects (an item, its key, its path, its
    numbers) they take about 265 bytes each. Here an item costs its key string (about 80 bytes
    for an ImageNet key) and 28 bytes of array entries: the path is not stored but derived from
    the root and the key (:func:`_derived_path`), and item ``i`` is made as a :class:`SourceItem`
    only when it is asked for. A table made from items whose paths do not follow that rule
    (:meth:`from_items`) keeps their paths.

    Slices, :meth:`take` and pickling keep only the rows they select (a shard task carries its
    own rows, not the whole table).

    Attributes:
        root: The folder the keys are relative to.
        keys: Item keys (numpy array of ``str`` objects).
        labels: Class indices (int32; labels are below :data:`MAX_CLASSES`).
        offsets: Byte offset of the image data in its tar shard, ``-1`` for a plain file (int64).
        sizes: Bytes of the image data (int64).
    """

    __slots__ = ("_paths", "keys", "labels", "offsets", "root", "sizes")

    def __init__(self, root: str, keys: Any, labels: Any, offsets: Any, sizes: Any, paths: Any = None) -> None:
        self.root = root
        self.keys: np.ndarray = np.asarray(keys, dtype=object)
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int32)
        self.offsets: np.ndarray = np.asarray(offsets, dtype=np.int64)
        self.sizes: np.ndarray = np.asarray(sizes, dtype=np.int64)
        self._paths: np.ndarray | None = None if paths is None else np.asarray(paths, dtype=object)
        columns = [self.keys, self.labels, self.offsets, self.sizes] + ([] if self._paths is None else [self._paths])
        if any(c.ndim != 1 or len(c) != len(self.keys) for c in columns):
            raise ValueError("the columns of an item table must be one-dimensional and of one length")

    @classmethod
    def from_items(cls, root: str, items: Iterable[SourceItem]) -> ItemTable:
        """The table of ``items``; their paths are kept when they are not those derived from
        ``root`` and their keys."""
        items = list(items)
        table = cls(root, [it.key for it in items], [it.label for it in items], [it.offset for it in items],
                    [it.size for it in items])
        if any(it.path != _derived_path(root, it.key, it.offset) for it in items):
            table = cls(root, table.keys, table.labels, table.offsets, table.sizes, [it.path for it in items])
        return table

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> SourceItem: ...

    @overload
    def __getitem__(self, index: slice) -> ItemTable: ...

    def __getitem__(self, index: int | slice) -> SourceItem | ItemTable:
        if isinstance(index, slice):
            return self.take(index)
        i = operator.index(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        key, offset = self.keys[i], int(self.offsets[i])
        path = _derived_path(self.root, key, offset) if self._paths is None else self._paths[i]
        return SourceItem(key, int(self.labels[i]), path, offset, int(self.sizes[i]))

    def __iter__(self) -> Iterator[SourceItem]:
        for start in range(0, len(self), 4096):  # one block of Python numbers at a time
            block = slice(start, start + 4096)
            paths = self._paths[block].tolist() if self._paths is not None else None
            rows = zip(self.keys[block].tolist(), self.labels[block].tolist(), self.offsets[block].tolist(), self.sizes[block].tolist())
            for j, (key, label, offset, size) in enumerate(rows):
                yield SourceItem(key, label, _derived_path(self.root, key, offset) if paths is None else paths[j], offset, size)

    def take(self, rows: slice | Sequence[int] | np.ndarray) -> ItemTable:
        """The table of the rows ``rows`` selects (a slice, or row numbers in any order)."""
        if not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.intp)
        paths = None if self._paths is None else self._paths[rows]
        return ItemTable(self.root, self.keys[rows], self.labels[rows], self.offsets[rows], self.sizes[rows], paths)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ItemTable):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash((len(self), self.keys[0] if len(self) else None))

    def __repr__(self) -> str:
        return f"ItemTable({len(self)} items below {self.root!r})"


class _Columns:
    """Items as they are found: a key string and three machine numbers each (no Python number
    objects held per item)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.labels = array("i")
        self.offsets = array("q")
        self.sizes = array("q")

    def add(self, key: str, label: int, size: int, offset: int = -1) -> None:
        self.keys.append(key)
        self.labels.append(label)
        self.sizes.append(size)
        self.offsets.append(offset)

    def table(self, root: str) -> ItemTable:
        """The items as a table, in the order they were added."""
        return ItemTable(root, self.keys, np.frombuffer(self.labels, dtype=np.int32), np.frombuffer(self.offsets, dtype=np.int64),
                         np.frombuffer(self.sizes, dtype=np.int64))


@dataclass(frozen=True)
class SourceListing:
    """The ordered list of samples of a dataset, with its class names.

    Attributes:
        kind: ``"imagefolder"``, ``"flat"`` (one class, :data:`FLAT_CLASS_NAME`) or ``"webdataset"``.
        root: The dataset folder (absolute).
        class_names: Class name of each label index.
        items: The samples, in listing order (a sequence of :class:`SourceItem` given here is
            stored as an :class:`ItemTable`).
        unlisted: Webdataset samples that were found but not listed: ``(reason, count)`` pairs,
            only for reasons with a non-zero count.
    """

    kind: str
    root: str
    class_names: tuple[str, ...]
    items: ItemTable
    unlisted: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.items, ItemTable):
            object.__setattr__(self, "items", ItemTable.from_items(self.root, self.items))

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
        items = self.items
        for start in range(0, len(items), 65536):
            block = slice(start, start + 65536)
            lines = map(_fingerprint_line, items.keys[block].tolist(), items.labels[block].tolist(), items.sizes[block].tolist())
            digest.update("".join(lines).encode("utf-8"))
        return digest.hexdigest()


def _fingerprint_line(key: str, label: int, size: int) -> str:
    """An item's line of the listing fingerprint: the bytes of ``json.dumps([key, label, size])``
    and a newline (json's own string escaping and separators, without its per-call overhead).
    Every cache stores fingerprints made from these lines: they must never change."""
    return f"[{encode_basestring_ascii(key)}, {label}, {size}]\n"


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
    columns = _Columns()
    # A key is "<class>/<path in the class folder>": the classes in the order of "<class>/", each
    # with its keys sorted, are all keys sorted (one class's sort order held at a time).
    for label in sorted(range(len(class_names)), key=lambda i: class_names[i] + "/"):
        for key, size in sorted(_files_below(root / class_names[label], class_names[label])):
            columns.add(key, label, size)
    return SourceListing(kind="imagefolder", root=str(root), class_names=tuple(class_names), items=columns.table(str(root)))


def _files_below(folder: Path, prefix: str) -> list[tuple[str, int]]:
    """``(key, size)`` of every regular non-hidden file below ``folder`` (links followed to files,
    not to folders; hidden folders and folders that cannot be read are left out, as ``os.walk``
    does), keys ``prefix/<relative posix path>``; one ``stat`` per file, for its size."""
    found: list[tuple[str, int]] = []
    todo = [(str(folder), prefix)]
    while todo:
        path, rel = todo.pop()
        try:
            entries = list(os.scandir(path))
        except OSError:
            continue
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if not entry.is_symlink():
                    todo.append((entry.path, f"{rel}/{entry.name}"))
                continue
            try:
                if not entry.is_file():  # broken links, sockets, fifos
                    continue
                size = entry.stat().st_size
            except OSError:  # as os.path.isfile: what cannot be looked at is not a file
                continue
            found.append((f"{rel}/{entry.name}", size))
    return found


def _list_flat(root: Path) -> SourceListing:
    """List a folder of image files without sub-folders as one class (unconditional training)."""
    found = [
        (entry.name, entry.stat().st_size)
        for entry in os.scandir(root)
        if not _is_hidden(entry.name) and entry.is_file()  # follows links; broken ones are not files
    ]
    columns = _Columns()
    for key, size in sorted(found):
        columns.add(key, 0, size)
    return SourceListing(kind="flat", root=str(root), class_names=(FLAT_CLASS_NAME,), items=columns.table(str(root)))


def _split_wds_name(name: str) -> tuple[str, str]:
    """Split a tar member name into (sample key, extension) the webdataset way.

    The key is the member path up to the first dot of its base name; the extension is the rest.
    """
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext if dot else ""


def _list_webdataset(root: Path, tar_names: list[str]) -> SourceListing:
    """List webdataset ``.tar`` shards by reading their headers and labels in one pass over each
    (no image is decoded)."""
    columns = _Columns()
    max_label = -1
    unlisted = {UNLISTED_INCOMPLETE: 0, UNLISTED_LABEL_TOO_LARGE: 0, UNLISTED_DUPLICATE: 0}
    for tar_name in tar_names:
        tar_path = root / tar_name
        # sample key -> extension -> member, keys in order of first appearance
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        labels: dict[str, int | None] = {}  # sample key -> the label its (first) cls member holds
        repeats: dict[str, dict[str, int]] = {}  # key -> extension -> later members with that name
        try:
            with tarfile.open(tar_path, mode="r:") as tar:
                for member in tar:
                    if not member.isfile() or member.issparse():
                        continue
                    if _is_hidden(member.name.rpartition("/")[2]):
                        continue
                    key, ext = _split_wds_name(member.name)
                    ext = ext.lower()
                    members = samples.setdefault(key, {})
                    if ext in members:
                        counts = repeats.setdefault(key, {})
                        counts[ext] = counts.get(ext, 0) + 1
                        continue
                    members[ext] = member
                    if ext == WDS_LABEL_EXTENSION:  # read now, next to the header just read
                        labels[key] = _read_wds_label(tar, member)
        except (tarfile.TarError, OSError) as exc:
            raise UsageError(f"cannot read tar shard {tar_path}: {one_line(exc, _MAX_ERROR_CHARS)}") from exc
        # A repeated key is a second sample under the same name: only the first one is listed.
        unlisted[UNLISTED_DUPLICATE] += sum(max(counts.values()) for counts in repeats.values())
        for key, members in samples.items():
            image = next((members[e] for e in WDS_IMAGE_EXTENSIONS if e in members), None)
            label = labels.get(key)
            if image is None or label is None:
                unlisted[UNLISTED_INCOMPLETE] += 1
                continue
            if label >= MAX_CLASSES:
                unlisted[UNLISTED_LABEL_TOO_LARGE] += 1
                continue
            max_label = max(max_label, label)
            columns.add(f"{tar_name}/{key}", label, image.size, image.offset_data)
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
        items=columns.table(str(root)),
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
    "FLAT_CLASS_NAME", "MAX_CLASSES", "MAX_LABEL_BYTES", "WDS_IMAGE_EXTENSIONS", "WDS_LABEL_EXTENSION", "ItemTable", "SourceItem", "SourceListing",
    "list_source", "read_bytes",
]
