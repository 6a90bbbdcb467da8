"""The read side of the cache: open a committed cache and read groups by index or by block.

Readers are stateless on disk (no locks, no reference counts), so any number of training runs
can read one cache at once, also while another process adds a group. A reader:

* refuses a cache or group without a commit record, and a group whose shards lack records or
  stored objects (naming the shard);
* reads only the groups it was asked for;
* never hands out fill values: rows of skipped inputs are refused by index, and any non-finite
  value in a row the manifest calls valid (a lost chunk reads back as NaN) raises, naming the
  shard; with ``verify_checksums=True`` each shard's stored bytes are also hashed on first touch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from cache.errors import CacheError
from cache.format import (
    FORMAT_VERSION,
    GROUP_ATTR,
    LATENTS,
    MANIFEST_FILE,
    ROOT_ATTR,
    TEACHER_PREFIX,
    CacheMeta,
    GroupMeta,
    ShardRecord,
    commit_path,
    read_json,
)
from cache.storage import StorePath, is_storage_error, store_path
from cache.writer import load_records, open_zarr, read_shard_bytes, shard_key

log = logging.getLogger(__name__)


def open_meta(path: str | Path | StorePath) -> tuple[StorePath, CacheMeta]:
    """Root (local folder or URL) and metadata of a cache, or a CacheError saying why it is not one."""
    root = store_path(path)
    if not (root / "zarr.json").is_file():
        if not root.exists():
            raise CacheError(f"no cache at {root}")
        raise CacheError(f"{root} is not a repa cache (no zarr.json)")
    try:
        attrs = open_zarr(root).attrs.asdict()
    except Exception as e:  # noqa: BLE001 - any failure but the storage's means "not a readable cache"
        if is_storage_error(e):
            raise
        raise CacheError(f"{root} is not a readable zarr group: {e}") from e
    if ROOT_ATTR not in attrs:
        raise CacheError(f"{root} is a zarr group but not a repa cache (no '{ROOT_ATTR}' attributes)")
    meta = CacheMeta.from_json(attrs[ROOT_ATTR])
    if meta.format_version > FORMAT_VERSION:
        raise CacheError(f"{root} has cache format v{meta.format_version}; this version reads v{FORMAT_VERSION}")
    return root, meta


def list_groups(root: StorePath | Path) -> list[str]:
    """Group paths present in the cache (committed or not), latents first."""
    root = store_path(root)
    out = []
    if (root / LATENTS / "zarr.json").exists():
        out.append(LATENTS)
    tdir = root / TEACHER_PREFIX.rstrip("/")
    out += [f"{TEACHER_PREFIX}{p.name}" for p in tdir.iterdir() if (p / "zarr.json").exists()]
    return out


def group_meta(root: StorePath | Path, group: str) -> GroupMeta:
    root = store_path(root)
    attrs = open_zarr(root / group).attrs.asdict()
    return GroupMeta.from_json(attrs[GROUP_ATTR])


def commit_record(root: StorePath | Path, group: str) -> dict[str, Any] | None:
    root = store_path(root)
    try:
        return read_json(commit_path(root, group))
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class GroupInfo:
    meta: GroupMeta
    commit: dict[str, Any]
    arrays: dict[str, zarr.Array]
    records: dict[int, ShardRecord]


class ReaderBase:
    """What every cache reader shares (the zarr store here, webdataset shards in cache.wds):
    metadata, labels, validity, and group lookup. Subclasses set ``root``, ``meta``, ``groups``,
    ``labels``, ``keys``, ``status`` and ``valid`` and implement ``read`` and ``read_block``."""

    root: StorePath
    meta: CacheMeta
    groups: dict[str, Any]
    valid: np.ndarray

    @staticmethod
    def resolve_group(name: str) -> str:
        return name if name == LATENTS or name.startswith(TEACHER_PREFIX) else f"{TEACHER_PREFIX}{name}"

    @property
    def num_samples(self) -> int:
        return self.meta.num_samples

    @property
    def views(self) -> tuple[str, ...]:
        return self.meta.views

    def group(self, name: str) -> Any:
        return self.groups[self.resolve_group(name)]

    def valid_indices(self) -> np.ndarray:
        """Cache indices whose inputs were encoded (not skipped), ascending."""
        return np.flatnonzero(self.valid)

    def _check_indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Indices as int64; CacheError for one out of range or of a skipped input."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise CacheError(f"index out of range [0, {self.num_samples}) in read()")
        bad = idx[~self.valid[idx]]
        if bad.size:
            raise CacheError(f"cache index {int(bad[0])} is a skipped input ({self.keys[int(bad[0])]}); read valid_indices() only")
        return idx

    def _check_views(self, views: Sequence[int] | np.ndarray, idx: np.ndarray) -> np.ndarray:
        v = np.asarray(views, dtype=np.int64)
        if v.shape != idx.shape:
            raise CacheError(f"read_views() needs one view per index ({idx.size} indices, {v.size} views)")
        if v.size and (v.min() < 0 or v.max() >= len(self.views)):
            raise CacheError(f"view out of range [0, {len(self.views)}) in read_views() (views: {', '.join(self.views)})")
        return v

    def read_views(self, indices: Sequence[int] | np.ndarray, views: Sequence[int] | np.ndarray,
                   groups: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Like ``read``, with one stored view per row: row ``i`` of every array is view
        ``views[i]`` of sample ``indices[i]``, shape ``(n, ...)`` (no view axis). Also returns
        ``out["view"]``. This generic version reads every view and picks; a backend that can read
        one view alone overrides it."""
        idx = self._check_indices(indices)
        v = self._check_views(views, idx)
        out = self.read(idx, groups=groups)
        rows = np.arange(idx.size)
        for k in [k for k in out if "/" in k]:
            out[k] = np.ascontiguousarray(out[k][rows, v])
        out["view"] = v
        return out

    def _select(self, groups: Iterable[str] | None) -> list[str]:
        if groups is None:
            return list(self.groups)
        names = [self.resolve_group(g) for g in groups]
        for g in names:
            if g not in self.groups:
                raise CacheError(f"group '{g}' was not opened by this reader (opened: {', '.join(self.groups)})")
        return names


class CacheReader(ReaderBase):
    """Random-access and block reads of a committed cache.

    ``groups`` names what to read: ``"latents"`` and/or ``"teachers/<name>"`` (a bare teacher
    name is accepted too). ``None`` opens every committed group. Returned arrays are keyed
    ``"<group>/<array>"``, e.g. ``"latents/mean"`` or ``"teachers/dinov2-vit-b/patch"``, and have
    shape ``(n, V, ...)`` with V the stored views (``meta.views``).
    """

    def __init__(self, path: str | Path | StorePath, groups: Iterable[str] | None = None, verify_checksums: bool = False) -> None:
        self.root, self.meta = open_meta(path)
        present = list_groups(self.root)
        if groups is None:
            wanted = [g for g in present if commit_path(self.root, g).exists()]
            if not wanted:
                raise CacheError(f"{self.root} has no committed group (was its precompute interrupted? run it again)")
        else:
            wanted = [self.resolve_group(g) for g in groups]
        self.verify_checksums = verify_checksums
        self._verified: set[tuple[str, int]] = set()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.groups: dict[str, GroupInfo] = {g: self._open_group(g, present) for g in wanted}
        manifest = (self.root / MANIFEST_FILE).read_parquet()
        self.labels: np.ndarray = manifest.column("label").to_numpy().astype(np.int64)
        self.keys: list[str] = manifest.column("key").to_pylist()
        self.status: np.ndarray = np.asarray(manifest.column("status").to_pylist())
        self.valid: np.ndarray = self.status != "skipped"

    # -- opening -------------------------------------------------------------------------------
    def _open_group(self, group: str, present: list[str]) -> GroupInfo:
        if group not in present:
            have = ", ".join(present) or "none"
            raise CacheError(f"{self.root} has no group '{group}' (groups present: {have})")
        commit = commit_record(self.root, group)
        if commit is None:
            raise CacheError(f"group '{group}' of {self.root} is not committed (its precompute did not finish; run it again)")
        gmeta = group_meta(self.root, group)
        if commit["fingerprint_hash"] != gmeta.fingerprint_hash:
            raise CacheError(f"group '{group}' of {self.root}: commit record does not match its metadata")
        grp = open_zarr(self.root / group)
        arrays = {spec.name: grp[spec.name] for spec in gmeta.arrays}
        records = load_records(self.root, self.meta, group)
        stored = (self.root / group).find()  # one listing instead of a lookup per shard object
        for shard in range(self.meta.num_shards):
            rec = records.get(shard)
            if rec is None:
                raise CacheError(f"group '{group}' of {self.root}: shard {shard} has no record (damaged cache)")
            for name, arr in arrays.items():
                if rec.checksums[name] != "absent" and shard_key(arr, shard) not in stored:
                    raise CacheError(f"group '{group}' of {self.root}: shard {shard} of '{name}' is missing")
        return GroupInfo(gmeta, commit, arrays, records)

    def group(self, name: str) -> GroupInfo:
        return self.groups[self.resolve_group(name)]

    def _this_process(self) -> None:
        """Reopen the arrays in a forked child (DataLoader workers): a remote store's client and
        event loop belong to the process that opened them."""
        if self._pid == os.getpid():
            return
        for g, info in self.groups.items():
            grp = open_zarr(self.root / g)
            self.groups[g] = dataclasses.replace(info, arrays={name: grp[name] for name in info.arrays})
        self._pid = os.getpid()

    # -- reading -------------------------------------------------------------------------------
    def read(self, indices: Sequence[int] | np.ndarray, groups: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Rows at ``indices`` (any order, repeats allowed) of the requested groups.

        Raises CacheError for an index out of range or of a skipped input.
        """
        self._this_process()
        idx = self._check_indices(indices)
        out: dict[str, np.ndarray] = {}
        for group in self._select(groups):
            self._check_shards(group, {self.meta.shard_of(int(i)) for i in np.unique(idx)})
            for name, arr in self.groups[group].arrays.items():
                out[f"{group}/{name}"] = self._gather(group, name, arr, idx, None)
        out["label"] = self.labels[idx]
        out["index"] = idx
        return out

    def read_views(self, indices: Sequence[int] | np.ndarray, views: Sequence[int] | np.ndarray,
                   groups: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Like ``read``, with one stored view per row (see :meth:`ReaderBase.read_views`). Reads
        only that view: where a chunk holds one view (the layout the writer uses) nothing else is
        decompressed, about half the work of ``read`` with two views; older caches with both views
        in a chunk read correctly, at the cost of ``read``."""
        self._this_process()
        idx = self._check_indices(indices)
        v = self._check_views(views, idx)
        out: dict[str, np.ndarray] = {}
        for group in self._select(groups):
            self._check_shards(group, {self.meta.shard_of(int(i)) for i in np.unique(idx)})
            for name, arr in self.groups[group].arrays.items():
                data = np.empty((idx.size, *arr.shape[2:]), arr.dtype)
                for view in np.unique(v).tolist():
                    sel = np.flatnonzero(v == view)
                    data[sel] = self._gather(group, name, arr, idx[sel], view)
                out[f"{group}/{name}"] = data
        out["label"] = self.labels[idx]
        out["index"] = idx
        out["view"] = v
        return out

    def _gather(self, group: str, name: str, arr: zarr.Array, idx: np.ndarray, view: int | None) -> np.ndarray:
        """Rows ``idx`` (any order) of one array, all views or one; checked finite."""
        order = np.argsort(idx, kind="stable")  # sorted, consecutive rows share shards and slices
        sorted_idx = idx[order]
        shape = arr.shape[1:] if view is None else arr.shape[2:]
        if sorted_idx.size:
            rows = self._decode(group, name, lambda: _read_runs(arr, sorted_idx, view), sorted_idx)
        else:
            rows = np.empty((0, *shape), arr.dtype)
        self._check_finite(group, name, rows, sorted_idx)
        data = np.empty_like(rows)
        data[order] = rows
        return data

    def read_block(self, start: int, stop: int, groups: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Valid rows of the contiguous block ``[start, stop)``; ``out["index"]`` says which."""
        if not 0 <= start <= stop <= self.num_samples:
            raise CacheError(f"block [{start}, {stop}) is outside [0, {self.num_samples})")
        self._this_process()
        keep = self.valid[start:stop]
        out: dict[str, np.ndarray] = {}
        for group in self._select(groups):
            info = self.groups[group]
            if stop > start:
                self._check_shards(group, set(range(self.meta.shard_of(start), self.meta.shard_of(stop - 1) + 1)))
            for name, arr in info.arrays.items():
                rows = self._decode(group, name, lambda a=arr: a[start:stop], np.arange(start, stop))[keep]
                self._check_finite(group, name, rows, np.arange(start, stop)[keep])
                out[f"{group}/{name}"] = rows
        idx = np.arange(start, stop)[keep]
        out["label"] = self.labels[idx]
        out["index"] = idx
        return out

    def _check_shards(self, group: str, shards: set[int]) -> None:
        if not self.verify_checksums:
            return
        for shard in sorted(shards):
            if (group, shard) in self._verified:
                continue
            problem = check_shard(self.groups[group], shard)
            if problem:
                raise CacheError(f"group '{group}' of {self.root}: shard {shard} {problem}")
            with self._lock:
                self._verified.add((group, shard))

    def _decode(self, group: str, name: str, read: Any, idx: np.ndarray) -> np.ndarray:
        """Run a zarr read; a chunk that does not decode becomes a CacheError naming its shard."""
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - codec errors of damaged data have many types
            shards = sorted({self.meta.shard_of(int(i)) for i in idx})
            for shard in shards:  # name the shard that is at fault
                problem = check_shard(self.groups[group], shard)
                if problem:
                    raise CacheError(f"group '{group}' of {self.root}: shard {shard} {problem}") from e
            raise CacheError(f"group '{group}' of {self.root}: shards {shards} of '{name}' do not decode: {e}") from e

    def _check_finite(self, group: str, name: str, rows: np.ndarray, idx: np.ndarray) -> None:
        if rows.size == 0:
            return
        finite = np.isfinite(rows.reshape(rows.shape[0], -1)).all(axis=1)
        if not finite.all():
            i = int(idx[np.flatnonzero(~finite)[0]])
            raise CacheError(
                f"group '{group}' of {self.root}: shard {self.meta.shard_of(i)} has missing or non-finite data "
                f"in '{name}' at index {i} (damaged cache; run `repa verify`)"
            )


def _read_runs(arr: zarr.Array, sorted_idx: np.ndarray, view: int | None = None) -> np.ndarray:
    """Rows ``sorted_idx`` (ascending, repeats allowed), one slice per run of consecutive indices;
    all views, or only ``view`` (then without the view axis).

    zarr 3.1's orthogonal (fancy) selection on sharded arrays computes an index per element and
    is some 40x slower per sample than plain slices (zarr-python #3829).
    """
    uniq, inverse = np.unique(sorted_idx, return_inverse=True)
    breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
    runs = np.split(uniq, breaks)
    if view is None:
        rows = np.concatenate([arr[int(r[0]) : int(r[-1]) + 1] for r in runs])
    else:
        rows = np.concatenate([arr[int(r[0]) : int(r[-1]) + 1, view] for r in runs])
    return rows[inverse]


def check_shard(info: GroupInfo, shard: int) -> str | None:
    """None when a shard's stored objects hash to its record, else what is wrong."""
    rec = info.records.get(shard)
    if rec is None:
        return "has no record"
    for name, arr in info.arrays.items():
        raw = read_shard_bytes(arr, shard)
        want = rec.checksums.get(name)
        if raw is None:
            if want != "absent":
                return f"of '{name}' is missing"
            continue
        if want == "absent":
            return f"of '{name}' holds data where none was written"
        if hashlib.sha256(raw).hexdigest() != want:
            return f"of '{name}' fails its checksum ({len(raw)} bytes stored, {rec.stored_bytes[name]} written)"
    return None
