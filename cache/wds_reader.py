"""Random access to a webdataset export (:mod:`cache.wds`) with the API of :class:`cache.reader.CacheReader`.

:class:`WdsReader` builds a per-shard index of member offsets from the tar headers on the first
read that touches a shard, then reads members with ``os.pread`` (ranged GETs on a URL): one read
per requested array per sample, never a scan of other shards. With ``verify_checksums`` it also
reads the shard's checksum file once (checked against ``index.json``) and checks the crc32c of
every member it reads; exports of version 1 have no checksum files, and their shards are hashed
whole on first touch.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import io
import os
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pyarrow.compute as pc

from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import (
    FORMAT_VERSION,
    CacheMeta,
    GroupMeta,
)
from repa_cache.cache.reader import ReaderBase, read_manifest_file
from repa_cache.cache.storage import StorePath, store_path
from repa_cache.cache.wds import (
    INDEX_FILE,
    KEY_FIELD,
    LABEL_FIELD,
    WDS_VERSION,
    is_export,
)


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
        return read_manifest_file(self.root / self.index["manifest"]["file"], self.meta, columns, "every export has one")

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
        if self._negative_scale(group, name, arr[None]) is not None:
            raise CacheError(f"{self.root}: shard {fname} has negative scales in '{group}/{name}' at index {index}")
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
