"""Webdataset export of a committed cache, and a reader with the same API as :class:`CacheReader`.

``export_wds(CACHE, OUT)`` writes plain webdataset tar shards (``webdataset.ShardWriter``), one tar
sample per valid cache index, in cache order::

    OUT/
      shard-000000.tar ...   members <key>.<field>, key = zero-padded cache index:
                               latents.mean.npy, latents.std.npy      (V, C, h, w) float32
                               teachers.<name>.patch.npy              (V, T, D)   stored dtype
                               teachers.<name>.cls.npy                (V, D)
                               cls (label), txt (source key)
      shard-000000.crc ...   the crc32c of every member's data (4 bytes each, little-endian):
                             sample by sample in the shard's order, members in the order of
                             index.json's "members"
      manifest.parquet       copy of the cache's manifest (index, key, label, status, ...)
      index.json             written last: shards (file, first/last index, count, bytes, sha256,
                             and its checksum file with that file's sha256), the field -> member
                             map and a copy of the cache metadata (root meta, every group's meta
                             and commit record, class names)

The shards stream with any webdataset loader (``wds.WebDataset(urls).decode()``). For random
access, :class:`WdsReader` builds a per-shard index of member offsets from the tar headers on the
first read that touches a shard, then reads members with ``os.pread``: one read per requested array
per sample, never a scan of other shards. With ``verify_checksums`` it also reads the shard's
checksum file once (checked against ``index.json``) and checks the crc32c of every member it reads:
the work follows the bytes read (exports of version 1 have no checksum files; their shards are
hashed whole on first touch). ``open_reader(path)`` picks the backend.

The export is committed like the cache: shards first (fsynced), then ``index.json`` atomically.
A folder without ``index.json`` (an interrupted export) is not an export. The destination must be
empty or one of our exports: ``.repa-export.json`` is written before the first shard (and removed
once ``index.json`` exists), so a rerun recognises and replaces an interrupted export of its own,
while a folder holding anything export-wds did not write is refused untouched. A ``_lock.json``
keeps a second export out of the folder while one runs (:mod:`cache.lock`).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import json
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pyarrow.compute as pc

from repa_cache.cache.defaults import DEFAULT_SHARD_BYTES
from repa_cache.cache.errors import CacheError, UsageError
from repa_cache.cache.format import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    CacheMeta,
    GroupMeta,
    write_json_atomic,
)
from repa_cache.cache.layout import bulk_reads
from repa_cache.cache.lock import LOCK_FILE, is_our_lock, writer_lock
from repa_cache.cache.progress import Progress, format_bytes
from repa_cache.cache.reader import CacheReader, ReaderBase
from repa_cache.cache.storage import StorePath, store_path

WDS_MARKER = "repa-cache-wds"
WDS_VERSION = 2  # 2: a crc32c per member, in a checksum file per shard
INDEX_FILE = "index.json"
EXPORT_MARKER = ".repa-export.json"  # written before the first shard: this folder is an export in progress
EXPORT_MARKER_FORMAT = "repa-cache-wds-export-in-progress"
SHARD_PATTERN = "shard-%06d.tar"
_SHARD_RE = re.compile(r"^shard-\d{6}\.(tar|crc)$")
LABEL_FIELD = "cls"
KEY_FIELD = "txt"
_TAR_MTIME = 0  # fixed member mtime: the same cache exports to byte-identical shards


def member_field(group: str, array: str) -> str:
    """Tar member suffix of one array: ``latents/mean`` -> ``latents.mean.npy``."""
    return f"{group.replace('/', '.')}.{array}.npy"


def crc_file(tar_name: str) -> str:
    """The checksum file of a tar shard: ``shard-000000.tar`` -> ``shard-000000.crc``."""
    return tar_name[: -len(".tar")] + ".crc"


def npy_bytes(arr: np.ndarray) -> bytes:
    """An array as a ``.npy`` member holds it (no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def crc32c(data: bytes) -> bytes:
    """The crc32c of ``data`` as 4 little-endian bytes (zarr's crc32c codec writes the same)."""
    return int(google_crc32c.value(data)).to_bytes(4, "little")


class _HashingWriter:
    """A write-only file wrapper that hashes and counts what goes through it, so a shard's
    checksum needs no second read (which would be a second download on an object store)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.nbytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def is_export(path: str | Path | StorePath) -> bool:
    """True when ``path`` is a finished webdataset export of a cache (``index.json`` with the marker)."""
    try:
        return json.loads((store_path(path) / INDEX_FILE).read_bytes()).get("format") == WDS_MARKER
    except (OSError, ValueError, AttributeError):
        return False


def _is_export_file(name: str) -> bool:
    """A name export-wds writes in its destination (shards, index, manifest, marker, lock, and the
    temporary names of its atomic writes)."""
    ours = (INDEX_FILE, MANIFEST_FILE, EXPORT_MARKER, LOCK_FILE)
    if _SHARD_RE.match(name) or name in ours or name == f"{LOCK_FILE}.takeover":
        return True
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in ours)


def _is_marker(path: StorePath) -> bool:
    try:
        return json.loads(path.read_bytes()).get("format") == EXPORT_MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_out(out: StorePath) -> list[str]:
    """The names in ``out`` that a new export replaces; UsageError when ``out`` is not ours.

    ``out`` is ours when it is absent or empty (our own lock aside), or when it carries our marker:
    a finished export's ``index.json``, or the ``.repa-export.json`` an export writes before its
    first shard. Even then, a file export-wds does not write is never touched: the export is refused.
    """
    if out.is_file():
        raise UsageError(f"output path {out} is an existing file, not a folder")
    names = [p.name for p in out.iterdir()]
    if all(n == LOCK_FILE and is_our_lock(out / n) for n in names):
        return []
    if not ((INDEX_FILE in names and is_export(out)) or (EXPORT_MARKER in names and _is_marker(out / EXPORT_MARKER))):
        raise UsageError(f"output folder {out} is not empty and is not a webdataset export of a cache "
                         "(export-wds writes only into an empty folder or one of its own exports; nothing was changed)")
    foreign = [n for n in names if not _is_export_file(n)]
    if foreign:
        raise UsageError(f"output folder {out} holds {foreign[0]!r}, which export-wds did not write; "
                         "move it away or choose another folder (nothing was changed)")
    return [n for n in names if n not in (LOCK_FILE, f"{LOCK_FILE}.takeover", EXPORT_MARKER)]


def _prepare_out(out: StorePath, source: StorePath) -> None:
    """Mark ``out`` as ours (before any shard), then clear a previous export of ours in it."""
    names = _check_out(out)
    out.mkdir()
    write_json_atomic(out / EXPORT_MARKER, {
        "format": EXPORT_MARKER_FORMAT, "source_cache": str(source),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    if INDEX_FILE in names:
        (out / INDEX_FILE).unlink()  # uncommit first: a half-rewritten export is never read as whole
    for n in names:
        if n != INDEX_FILE:
            (out / n).unlink()


@bulk_reads()
def export_wds(
    cache_path: str | Path,
    out_dir: str | Path,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    groups: Iterable[str] | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Export the committed groups of a cache (or ``groups``) to webdataset shards; returns the index.

    ``shard_bytes`` bounds the payload of a tar shard (a shard closes once it reaches it, so a shard
    exceeds it by at most one sample). Refuses an uncommitted or damaged cache (through
    :class:`CacheReader`, checking every shard's checksum as it reads it) and an output folder
    that holds anything but a previous export (which it replaces).
    """
    if shard_bytes <= 0:
        raise UsageError(f"--shard-bytes must be positive, not {shard_bytes}")
    # Checksums on: an export must never give damaged cache data fresh, valid-looking checksums.
    reader = CacheReader(cache_path, groups=groups, verify_checksums=True)
    out = store_path(out_dir)
    if out.is_within(reader.root):
        raise UsageError(f"output folder {out} is inside the cache {reader.root}")
    _check_out(out)  # refuse a folder that is not ours before writing anything into it
    with writer_lock(out, "repa export-wds"):
        return _export_locked(reader, out, shard_bytes, quiet)


def _export_locked(reader: CacheReader, out: StorePath, shard_bytes: int, quiet: bool) -> dict[str, Any]:
    _prepare_out(out, reader.root.resolve())
    meta = reader.meta
    fields = {f"{g}/{a.name}": member_field(g, a.name) for g, info in reader.groups.items() for a in info.meta.arrays}
    width = max(9, len(str(meta.num_samples - 1)))

    shards: list[dict[str, Any]] = []
    open_files: dict[str, Any] = {}
    members: dict[str, list[int]] = {}
    crcs: dict[str, bytearray] = {}  # tar name -> the crc32c of each member written to it, in checksum-file order
    order = sorted([*fields.values(), LABEL_FIELD, KEY_FIELD])  # the members of a sample, as the checksum file lists them

    def opener(fname: str):
        f = _HashingWriter((out / fname).open("wb"))
        open_files[fname] = f
        members[fname] = []
        crcs[fname] = bytearray()
        return f

    def post(fname: str) -> None:  # ShardWriter calls this after closing the tar stream of a shard
        f = open_files.pop(fname)
        f.close()  # an object-store upload completes here, whole or not at all
        path = out / fname
        path.fsync()
        idx = members.pop(fname)
        table = bytes(crcs.pop(fname))
        if not idx:  # ShardWriter opens its first shard before any sample: an empty export
            path.unlink()
            return
        crc_path = out / crc_file(fname)
        crc_path.write_bytes(table)  # atomic, and before index.json lists it
        shards.append({"file": fname, "first": idx[0], "last": idx[-1], "count": len(idx),
                       "bytes": f.nbytes, "sha256": f.sha.hexdigest(),
                       "crc_file": crc_file(fname), "crc_sha256": hashlib.sha256(table).hexdigest()})

    import webdataset as wds

    block = max(1, min(meta.shard_size, 256))
    with (
        Progress(meta.num_samples, "export-wds", "samples", quiet=quiet) as bar,  # cache indices, skipped ones included
        wds.ShardWriter(SHARD_PATTERN, maxcount=1 << 40, maxsize=float(shard_bytes), post=post,
                        verbose=0, opener=opener, mtime=_TAR_MTIME) as sink,
    ):
        for start in range(0, meta.num_samples, block):
            data = reader.read_block(start, min(start + block, meta.num_samples), raw=True)  # as stored: int8 tokens stay int8
            for j, i in enumerate(data["index"].tolist()):
                sample: dict[str, Any] = {LABEL_FIELD: str(int(data["label"][j])).encode("ascii"),
                                          KEY_FIELD: reader.keys[i].encode("utf-8")}  # the bytes webdataset would write
                for name, member in fields.items():
                    sample[member] = npy_bytes(data[name][j])
                sink.write({"__key__": f"{i:0{width}d}", **sample})
                members[sink.fname].append(i)
                crcs[sink.fname] += b"".join(crc32c(sample[m]) for m in order)
            bar.update(min(block, meta.num_samples - start))

    manifest_bytes = (reader.root / MANIFEST_FILE).read_bytes()
    (out / MANIFEST_FILE).write_bytes(manifest_bytes)
    index = {
        "format": WDS_MARKER,
        "wds_version": WDS_VERSION,
        "cache_format_version": FORMAT_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_cache": str(reader.root.resolve()),
        "key_width": width,
        "num_samples": sum(s["count"] for s in shards),
        "shard_bytes": int(shard_bytes),
        "fields": fields,
        "members": order,
        "label_field": LABEL_FIELD,
        "key_field": KEY_FIELD,
        "manifest": {"file": MANIFEST_FILE, "sha256": hashlib.sha256(manifest_bytes).hexdigest()},
        "class_names": list(meta.class_names),
        "cache": {
            "meta": meta.to_json(),
            "groups": {g: {"meta": info.meta.to_json(), "commit": info.commit} for g, info in reader.groups.items()},
        },
        "shards": shards,
    }
    write_json_atomic(out / INDEX_FILE, index)  # written last: the export is complete
    (out / EXPORT_MARKER).unlink()  # index.json now marks the folder as ours
    return index


def describe_export(index: dict[str, Any], out: str | Path | StorePath) -> str:
    total = sum(s["bytes"] for s in index["shards"])
    groups = ", ".join(index["cache"]["groups"])
    return (f"exported {index['num_samples']} samples to {len(index['shards'])} webdataset shards in {out} "
            f"({format_bytes(total)}; groups: {groups})")


# -- reading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WdsGroup:
    """A group of an export: its metadata and commit record as in the cache, and its members."""

    meta: GroupMeta
    commit: dict[str, Any]
    members: dict[str, str]  # array name -> tar member suffix


#: member tables (offsets and checksums of every member of a shard) one reader keeps: about
#: 100 KiB each for ImageNet-size shards of 1 GB
TABLES_KEPT = 256


@dataclass(frozen=True)
class _ShardTable:
    """Where the members of one tar shard are: ``indices`` (count,) its cache indices, ascending;
    ``spans`` (count, members, 2) offset and size of each member's data (-1: absent), members in
    the reader's member order; ``crcs`` (count, members) their crc32c, or None."""

    indices: np.ndarray
    spans: np.ndarray
    crcs: np.ndarray | None


class WdsReader(ReaderBase):
    """Read a webdataset export with the same API as :class:`cache.reader.CacheReader`.

    ``read``/``read_block`` return the same dicts (``"<group>/<array>"`` of shape ``(n, V, ...)`` in
    the stored dtype, plus ``label`` and ``index``) and raise the same ``CacheError`` for indices out
    of range, skipped inputs and groups not opened.
    """

    def __init__(self, path: str | Path | StorePath, groups: Iterable[str] | None = None, verify_checksums: bool = False) -> None:
        self.root = store_path(path)
        if not is_export(self.root):
            if not self.root.exists():
                raise CacheError(f"no cache export at {self.root}")
            raise CacheError(f"{self.root} is not a webdataset export of a repa cache (no finished {INDEX_FILE})")
        self.index: dict[str, Any] = (self.root / INDEX_FILE).read_json()
        if self.index.get("wds_version", 0) > WDS_VERSION:
            raise CacheError(f"{self.root} is export v{self.index['wds_version']}; this version reads v{WDS_VERSION}")
        self.meta = CacheMeta.from_json(self.index["cache"]["meta"])
        if self.meta.format_version > FORMAT_VERSION:
            raise CacheError(f"{self.root} has cache format v{self.meta.format_version}; this version reads v{FORMAT_VERSION}")
        exported = self.index["cache"]["groups"]
        wanted = list(exported) if groups is None else [self.resolve_group(g) for g in groups]
        if not wanted:
            raise CacheError(f"{self.root} has no committed group")
        self.groups: dict[str, WdsGroup] = {}
        for g in wanted:
            if g not in exported:
                raise CacheError(f"{self.root} has no group '{g}' (groups present: {', '.join(exported) or 'none'})")
            gmeta = GroupMeta.from_json(exported[g]["meta"])
            commit = exported[g]["commit"]
            if commit["fingerprint_hash"] != gmeta.fingerprint_hash:
                raise CacheError(f"group '{g}' of {self.root}: commit record does not match its metadata")
            self.groups[g] = WdsGroup(gmeta, commit, {a.name: self.index["fields"][f"{g}/{a.name}"] for a in gmeta.arrays})
        self.verify_checksums = verify_checksums
        self.shards: list[dict[str, Any]] = self.index["shards"]
        stored = self.root.find()  # one listing, not a lookup per shard
        for s in self.shards:
            if s["file"] not in stored:
                raise CacheError(f"{self.root}: shard {s['file']} is missing")
            if stored[s["file"]] != s["bytes"]:
                raise CacheError(f"{self.root}: shard {s['file']} has {stored[s['file']]} bytes, {s['bytes']} written")
        self._firsts = [s["first"] for s in self.shards]
        manifest = self._manifest(["label", "status"])
        self.labels: np.ndarray = manifest.column("label").to_numpy().astype(np.int64)
        self.valid: np.ndarray = pc.not_equal(manifest.column("status"), "skipped").to_numpy(zero_copy_only=False)
        if manifest.num_rows != self.meta.num_samples:
            raise CacheError(f"{self.root}: manifest has {manifest.num_rows} rows, the cache {self.meta.num_samples} samples")
        self._lock = threading.Lock()
        # the members of a sample, in the order of the checksum files (exports of version 1: the same order)
        self._member_order: list[str] = list(self.index.get("members") or sorted([*self.index["fields"].values(), LABEL_FIELD,
                                                                                   KEY_FIELD]))
        self._tables: OrderedDict[int, _ShardTable] = OrderedDict()  # the shards this process read last
        self._verified: set[int] = set()  # exports of version 1: shards hashed whole by this process

    def _manifest(self, columns: list[str]) -> Any:
        return (self.root / self.index["manifest"]["file"]).read_parquet(columns=columns)

    @functools.cached_property
    def keys(self) -> Sequence[str]:  # type: ignore[override]
        """Source key by cache index (read from the manifest when first asked for)."""
        return self._manifest(["key"]).column("key").to_pylist()

    @functools.cached_property
    def status(self) -> np.ndarray:  # type: ignore[override]
        """Outcome by cache index (read from the manifest when first asked for)."""
        return np.asarray(self._manifest(["status"]).column("status").to_pylist())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def group(self, name: str) -> WdsGroup:
        return self.groups[self.resolve_group(name)]

    def array_names(self, group: str) -> list[str]:
        return list(self.groups[group].members)

    # -- shard index ---------------------------------------------------------------------------
    def _shard_of(self, index: int) -> int:
        s = bisect.bisect_right(self._firsts, index) - 1
        if s < 0 or index > self.shards[s]["last"]:
            raise CacheError(f"{self.root}: cache index {index} is valid but in no shard (damaged export)")
        return s

    def _members(self, shard: int) -> _ShardTable:
        """Where each member of a shard is, from its tar headers, and (verifying an export of
        version 2) the crc32c of each, from its checksum file; read once while the shard stays
        among the last :data:`TABLES_KEPT` a process read."""
        with self._lock:
            got = self._tables.get(shard)
            if got is not None:
                self._tables.move_to_end(shard)
                return got
        info = self.shards[shard]
        path = self.root / info["file"]
        crcs = None
        if self.verify_checksums and "crc_file" in info:
            crcs = self._read_crcs(shard)
        elif self.verify_checksums and shard not in self._verified:  # an export of version 1
            if path.sha256() != info["sha256"]:
                raise CacheError(f"{self.root}: shard {info['file']} fails its checksum")
            self._verified.add(shard)
        column = {m: c for c, m in enumerate(self._member_order)}
        found: dict[int, list[tuple[int, int]]] = {}
        try:
            # Reads headers only and seeks over the data (on an object store, through fsspec's
            # read-ahead buffer, which for large members still fetches most of the shard once).
            with path.open("rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, suffix = m.name.partition(".")
                    row = found.setdefault(int(key), [(-1, -1)] * len(column))
                    if suffix in column:
                        row[column[suffix]] = (m.offset_data, m.size)
        except (tarfile.TarError, ValueError, OSError) as e:
            raise CacheError(f"{self.root}: shard {info['file']} is not a readable tar: {e}") from e
        if len(found) != info["count"]:
            raise CacheError(f"{self.root}: shard {info['file']} holds {len(found)} samples, {info['count']} written")
        indices = np.array(sorted(found), dtype=np.int64)
        spans = np.array([found[i] for i in indices.tolist()], dtype=np.int64).reshape(len(indices), len(column), 2)
        table = _ShardTable(indices, spans, crcs)
        with self._lock:
            self._tables[shard] = table
            while len(self._tables) > TABLES_KEPT:
                self._tables.popitem(last=False)
        return table

    def _read_crcs(self, shard: int) -> np.ndarray:
        """A shard's checksum file, checked against ``index.json``: its sha256, and one crc32c per
        member of each of its samples. (count, members) uint32."""
        info = self.shards[shard]
        n = len(self._member_order)
        count = info.get("count")
        if not isinstance(count, int) or not 0 < count <= self.meta.num_samples:
            raise CacheError(f"{self.root}: index.json gives shard {info['file']} {count!r} samples (damaged export)")
        path = self.root / str(info["crc_file"])
        try:
            size = path.size()
            if size != 4 * n * count:
                raise CacheError(f"{self.root}: checksum file {path.name} has {size} bytes, {4 * n * count} written (damaged export)")
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CacheError(f"{self.root}: checksum file {path.name} of shard {info['file']} is missing (damaged export)") from None
        if hashlib.sha256(raw).hexdigest() != info.get("crc_sha256"):
            raise CacheError(f"{self.root}: checksum file {path.name} of shard {info['file']} fails its checksum (damaged export)")
        return np.frombuffer(raw, dtype="<u4").reshape(count, n)

    # -- reading -------------------------------------------------------------------------------
    def read(self, indices: Sequence[int] | np.ndarray, groups: Iterable[str] | None = None, *,
             fields: Iterable[str] | None = None, raw: bool = False) -> dict[str, np.ndarray]:
        """Rows at ``indices`` (any order, repeats allowed) of the requested groups (or only the
        ``fields``, see :class:`cache.reader.ReaderBase`).

        Raises CacheError for an index out of range or of a skipped input.
        """
        idx = self._check_indices(indices)
        asked = self._fields(groups, fields)
        wanted = self._stored(asked)  # quantised arrays with their scales
        out: dict[str, np.ndarray] = {}
        for g, name in wanted:
            spec = self.groups[g].meta.array(name)
            out[f"{g}/{name}"] = np.empty((idx.size, len(self.views), *spec.sample_shape), dtype=spec.dtype)
        uniq, inverse = np.unique(idx, return_inverse=True)
        by_shard: dict[int, list[int]] = {}
        for u, i in enumerate(uniq.tolist()):
            by_shard.setdefault(self._shard_of(i), []).append(u)
        rows: dict[str, list[Any]] = {name: [None] * uniq.size for name in out}
        column = {m: c for c, m in enumerate(self._member_order)}
        for shard, us in sorted(by_shard.items()):
            table = self._members(shard)
            fname = self.shards[shard]["file"]
            with _RangeReader(self.root / fname) as shard_file:
                for u in us:
                    i = int(uniq[u])
                    row = int(np.searchsorted(table.indices, i))
                    if row >= table.indices.size or table.indices[row] != i:
                        raise CacheError(f"{self.root}: shard {fname} has no sample for cache index {i} (damaged export)")
                    for g, name in wanted:
                        suffix = self.groups[g].members[name]
                        off, size = (int(v) for v in table.spans[row, column[suffix]]) if suffix in column else (-1, -1)
                        if off < 0:
                            raise CacheError(f"{self.root}: shard {fname} lacks '{suffix}' of cache index {i}")
                        member = shard_file.read(off, size)
                        if table.crcs is not None and google_crc32c.value(member) != int(table.crcs[row, column[suffix]]):
                            raise CacheError(f"{self.root}: shard {fname}: '{suffix}' of cache index {i} fails its checksum "
                                             "(damaged, swapped or stale shard; export the cache again)")
                        rows[f"{g}/{name}"][u] = self._decode(member, fname, i, g, name)
        for name, arr in out.items():
            if idx.size:
                arr[...] = np.stack(rows[name])[inverse.reshape(-1)]
        out = self._decoded(out, asked, raw)
        out["label"] = self.labels[idx]
        out["index"] = idx
        return out

    def _decode(self, raw: bytes, fname: str, index: int, group: str, name: str) -> np.ndarray:
        spec = self.groups[group].meta.array(name)
        try:
            arr = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
        except Exception as e:
            raise CacheError(f"{self.root}: shard {fname}: '{group}/{name}' of cache index {index} does not decode: {e}") from e
        want = (len(self.views), *spec.sample_shape)
        if arr.shape != want or arr.dtype != np.dtype(spec.dtype):
            raise CacheError(f"{self.root}: shard {fname}: '{group}/{name}' of cache index {index} is {arr.dtype}{arr.shape}, "
                             f"expected {spec.dtype}{want}")
        if not np.isfinite(arr).all():
            raise CacheError(f"{self.root}: shard {fname} has non-finite data in '{group}/{name}' at index {index}")
        return arr


class _RangeReader:
    """Reads byte ranges of one file: ``pread`` on one descriptor locally, ranged GETs on a URL."""

    def __init__(self, path: StorePath) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _RangeReader:
        if self.path.is_local:
            self.fd = os.open(self.path.path, os.O_RDONLY)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset) if self.fd is not None else self.path.read_range(offset, size)


def open_meta_any(path: str | Path | StorePath) -> tuple[StorePath, CacheMeta, list[str]]:
    """(root, metadata, groups present) of a cache or of an export, without opening any group.

    For a cache, the groups present include uncommitted ones (as :func:`cache.reader.list_groups`);
    an export holds committed groups only.
    """
    if is_export(path):
        root = store_path(path)
        index = (root / INDEX_FILE).read_json()
        return root, CacheMeta.from_json(index["cache"]["meta"]), list(index["cache"]["groups"])
    from repa_cache.cache.reader import list_groups, open_meta

    root, meta = open_meta(path)
    return root, meta, list_groups(root)


def open_reader(path: str | Path | StorePath, groups: Iterable[str] | None = None, verify_checksums: bool = False) -> CacheReader | WdsReader:
    """A :class:`WdsReader` for a webdataset export (``index.json`` with the marker), else a :class:`CacheReader`."""
    if is_export(path):
        return WdsReader(path, groups=groups, verify_checksums=verify_checksums)
    return CacheReader(path, groups=groups, verify_checksums=verify_checksums)


__all__ = [
    "DEFAULT_SHARD_BYTES",
    "INDEX_FILE",
    "WDS_MARKER",
    "WdsGroup",
    "WdsReader",
    "describe_export",
    "export_wds",
    "is_export",
    "member_field",
    "open_meta_any",
    "open_reader",
]
