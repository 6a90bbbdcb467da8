"""The read side of the cache: open a committed cache and read groups by index or by block.

Readers are stateless on disk (no locks, no reference counts), so any number of training runs
can read one cache at once, also while another process adds a group. A reader:

* refuses a cache or group without a commit record, and a group whose shards lack records or
  stored objects (naming the shard);
* reads only the groups it was asked for;
* never hands out fill values: rows of skipped inputs are refused by index, and any non-finite
  value in a row the manifest calls valid (a lost chunk reads back as NaN) raises, naming the
  shard;
* with ``verify_checksums=True`` checks what it reads against the shard records: in a group
  written by format v2 every chunk it fetches, as it fetches it (:mod:`cache.chunks`: the work
  follows the bytes read), in a v1 group each shard's whole stored bytes on first touch.

What a reader holds grows with the cache only by its label and validity arrays (9 bytes per
sample) and, as shards are read, their records' chunk checksums: no shard record is read before
its shard is, and the manifest's keys and reasons stay on disk until asked for.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zarr
from zarr.core.sync import sync as zarr_sync  # runs a coroutine on zarr's own event loop

from repa_cache.cache.chunks import CheckedStore, ChunkLayout, ChunkTable, chunk_layout
from repa_cache.cache.codec import MISSING_INT8, Int8Codec, decode_numpy, scale_name, stored_arrays
from repa_cache.cache.errors import CacheError, one_line
from repa_cache.cache.format import (
    FORMAT_VERSION,
    GROUP_ATTR,
    LATENTS,
    MANIFEST_FILE,
    PLAN_FILE,
    ROOT_ATTR,
    TEACHER_PREFIX,
    ArraySpec,
    CacheMeta,
    GroupMeta,
    ShardRecord,
    commit_path,
    group_problem,
    meta_problem,
    read_json,
    record_path,
)
from repa_cache.cache.layout import open_zarr, read_shard_bytes, record_shards, shard_key, zarr_array
from repa_cache.cache.storage import StorePath, is_storage_error, store_path

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
    except Exception as e:
        if is_storage_error(e):
            raise
        raise CacheError(f"{root} is not a readable zarr group: {e}") from e
    if ROOT_ATTR not in attrs:
        raise CacheError(f"{root} is a zarr group but not a repa cache (no '{ROOT_ATTR}' attributes)")
    try:
        meta = CacheMeta.from_json(_json_object(attrs[ROOT_ATTR], f"{root}: root attributes"))
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{root}: root attributes are incomplete (damaged cache): {one_line(e)}") from e
    if not isinstance(meta.format_version, int) or meta.format_version > FORMAT_VERSION:
        raise CacheError(f"{root} has cache format v{meta.format_version}; this version reads v{FORMAT_VERSION}")
    problem = meta_problem(meta)
    if problem:
        raise CacheError(f"{root}: root metadata out of bounds: {problem} (damaged cache)")
    return root, meta


def _rows(path: StorePath) -> int:
    try:
        return path.parquet_rows()
    except FileNotFoundError:
        raise
    except Exception as e:
        if is_storage_error(e):
            raise
        raise CacheError(f"{path} is not a readable Parquet file (damaged cache): {one_line(e)}") from e


def _check_rows(path: StorePath, meta: CacheMeta, missing: str) -> None:
    """A Parquet table of the cache exists and has one row per sample; ``missing`` says why its
    absence is damage."""
    try:
        n = _rows(path)
    except FileNotFoundError:
        raise CacheError(f"{path} is missing ({missing})") from None
    if n != meta.num_samples:
        raise CacheError(f"{path} has {n} rows but the cache metadata says {meta.num_samples} samples (damaged cache)")


def check_plan(root: StorePath, meta: CacheMeta) -> None:
    """The plan exists and has one row per sample (so ``num_samples`` can be trusted for sizes)."""
    _check_rows(root / PLAN_FILE, meta, "damaged cache, or its precompute was killed before the plan; run it again")


def read_manifest(root: StorePath, meta: CacheMeta, columns: list[str] | None = None) -> Any:
    """The manifest (required once a group is committed), checked to have one row per sample."""
    return read_manifest_file(root / MANIFEST_FILE, meta, columns, "every committed cache has one; damaged cache")


#: The manifest's columns that readers use, and the Arrow type each must have.
_MANIFEST_TYPES = {"index": pa.types.is_integer, "key": pa.types.is_string, "label": pa.types.is_integer,
                   "status": pa.types.is_string, "reason": pa.types.is_string, "width": pa.types.is_integer,
                   "height": pa.types.is_integer}
#: The outcome of each input, as the manifest's ``status`` column records it.
STATUSES = ("ok", "converted", "skipped")


def read_manifest_file(path: StorePath, meta: CacheMeta, columns: list[str] | None, missing: str) -> Any:
    """A manifest (the columns asked for, every column when None), checked before it is used: one
    row per sample (from the footer, before any data is read), the types of the columns readers
    use, labels in ``[0, classes)`` and known outcomes. ``missing`` says why its absence is damage.

    Raises:
        CacheError: one line naming the file and what is wrong with it (damaged cache).
    """
    _check_rows(path, meta, missing)
    try:
        table = path.read_parquet(columns=columns)
    except Exception as e:
        if is_storage_error(e):
            raise
        raise CacheError(f"{path} is not a readable manifest (damaged cache): {one_line(e)}") from e
    problem = _manifest_problem(table, meta, required=columns or ["key", "label", "status", "reason"])
    if problem:
        raise CacheError(f"{path} is not a manifest of this cache: {problem} (damaged cache)")
    return table


def _manifest_problem(table: Any, meta: CacheMeta, required: list[str]) -> str | None:
    """What makes a manifest table unusable for a cache of ``meta``, or None."""
    absent = [c for c in required if c not in table.column_names]
    if absent:
        return f"it has no column {', '.join(repr(c) for c in absent)}"
    for name in table.column_names:
        want = _MANIFEST_TYPES.get(name)
        if want is not None and not want(table.schema.field(name).type):
            return f"column '{name}' holds {table.schema.field(name).type}"
        if want is not None and table.column(name).null_count:
            return f"column '{name}' has {table.column(name).null_count} missing values"
    if "label" in table.column_names and table.num_rows:
        lo, hi = pc.min_max(table.column("label")).values()
        classes = len(meta.class_names)
        if lo.as_py() < 0 or hi.as_py() >= classes:
            return f"labels range over [{lo.as_py()}, {hi.as_py()}], the cache has classes 0..{classes - 1}"
    if "status" in table.column_names:
        unknown = pc.unique(pc.filter(table.column("status"), pc.invert(pc.is_in(table.column("status"), pa.array(STATUSES)))))
        if len(unknown):
            return f"status {unknown[0].as_py()!r} is not one of {', '.join(STATUSES)}"
    return None


def array_problem(arr: zarr.Array, meta: CacheMeta, spec: ArraySpec) -> str | None:
    """What is wrong with an array's stored shape, sharding or dtype against the cache and group
    metadata (which were bounded), or None. Checked before anything sized by the array is read."""
    want = (meta.num_samples, len(meta.views), *spec.sample_shape)
    if tuple(arr.shape) != want:
        return f"array '{spec.name}' has shape {tuple(arr.shape)}, the metadata says {want}"
    shards = arr.shards
    if shards is None or tuple(shards) != (meta.shard_size, *want[1:]):
        return f"array '{spec.name}' is stored in shards of {shards}, the metadata says {(meta.shard_size, *want[1:])}"
    if np.dtype(arr.dtype) != np.dtype(spec.dtype):
        return f"array '{spec.name}' is {arr.dtype}, the metadata says {spec.dtype}"
    return None


def group_arrays(root: StorePath, meta: CacheMeta, group: str, gmeta: GroupMeta) -> dict[str, zarr.Array]:
    """The arrays of a group, each checked against the metadata (CacheError naming what differs)."""
    grp = open_zarr(root / group)
    arrays = {}
    for spec in gmeta.arrays:
        if spec.name not in grp:
            raise CacheError(f"group '{group}' of {root}: array '{spec.name}' is missing (damaged cache)")
        arrays[spec.name] = arr = zarr_array(grp, spec.name)
        problem = array_problem(arr, meta, spec)
        if problem:
            raise CacheError(f"group '{group}' of {root}: {problem} (damaged cache)")
    return arrays


def _is_group(path: StorePath) -> bool:
    """True when ``path`` holds a group of ours: a zarr.json whose attributes carry the group
    metadata. A group without them was cut off before its creation finished (the writer sets them
    last, in one write) and is treated as absent; an unreadable zarr.json counts as present, so
    that ``verify`` reports it as damaged."""
    try:
        raw = (path / "zarr.json").read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return False
    try:
        attrs = json.loads(raw).get("attributes") or {}
    except (ValueError, AttributeError):
        return True
    return isinstance(attrs, dict) and GROUP_ATTR in attrs


def list_groups(root: StorePath | Path) -> list[str]:
    """Group paths present in the cache (committed or not), latents first. A group whose creation
    did not finish (no group attributes yet) is not listed."""
    root = store_path(root)
    out = []
    if _is_group(root / LATENTS):
        out.append(LATENTS)
    tdir = root / TEACHER_PREFIX.rstrip("/")
    out += [f"{TEACHER_PREFIX}{p.name}" for p in tdir.iterdir() if _is_group(p)]
    return out


def group_meta(root: StorePath | Path, group: str) -> GroupMeta:
    root = store_path(root)
    try:
        attrs = open_zarr(root / group).attrs.asdict()
    except Exception as e:
        if is_storage_error(e) and not isinstance(e, FileNotFoundError):
            raise
        raise CacheError(f"group '{group}' of {root} is not a readable zarr group (damaged cache): {one_line(e)}") from e
    if GROUP_ATTR not in attrs:
        raise CacheError(f"group '{group}' of {root} has no '{GROUP_ATTR}' attributes (its creation did not finish; "
                         "run the precompute again)")
    try:
        gmeta = GroupMeta.from_json(_json_object(attrs[GROUP_ATTR], f"{root / group}: group attributes"))
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{root / group}: group attributes are incomplete (damaged cache): {one_line(e)}") from e
    problem = group_problem(gmeta)
    if problem:
        raise CacheError(f"group '{group}' of {root}: metadata out of bounds: {problem} (damaged cache)")
    return gmeta


def _json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CacheError(f"{what} are not a JSON object (damaged cache)")
    return value


def commit_record(root: StorePath | Path, group: str) -> dict[str, Any] | None:
    root = store_path(root)
    try:
        return read_json(commit_path(root, group))
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class GroupInfo:
    """An opened group: its metadata, commit record and arrays; ``layouts`` holds each array's
    :class:`cache.chunks.ChunkLayout`, or None for an array written before format v2 (no chunk
    checksums: checked with whole-shard sha256)."""

    meta: GroupMeta
    commit: dict[str, Any]
    arrays: dict[str, zarr.Array]
    layouts: dict[str, ChunkLayout | None]

    @property
    def chunk_checked(self) -> bool:
        """True when every array carries chunk checksums (the group was written by format v2)."""
        return all(layout is not None for layout in self.layouts.values())


def _quantised(codec: Int8Codec | None) -> tuple[str, ...]:
    """The arrays a group stores quantised (none for a float group)."""
    return codec.arrays if codec is not None else ()


class GroupView(Protocol):
    """What every reader tells of an opened group: its metadata and its commit record."""

    @property
    def meta(self) -> GroupMeta: ...

    @property
    def commit(self) -> dict[str, Any]: ...


class ReaderBase(abc.ABC):
    """What every cache reader shares (the zarr store here, webdataset shards in cache.wds_reader):
    metadata, labels, validity, group lookup, and block and per-view reads built on ``read``.
    Subclasses set ``root``, ``meta``, ``groups``, ``labels``, ``keys``, ``status`` and ``valid``
    and implement ``read`` and ``array_names``. ``read``/``read_block``/``read_views`` take either
    ``groups`` (every array of those groups) or ``fields`` (only the named ``"<group>/<array>"``
    arrays, e.g. the trainer's latents and patch tokens without the CLS tokens it does not use)."""

    root: StorePath
    meta: CacheMeta
    groups: Mapping[str, GroupView]
    labels: np.ndarray  # (N,) int64, by cache index
    keys: Sequence[str]  # source key by cache index
    status: np.ndarray  # (N,) "ok" | "converted" | "skipped"
    valid: np.ndarray  # (N,) bool: status != "skipped"

    @staticmethod
    def resolve_group(name: str) -> str:
        return name if name == LATENTS or name.startswith(TEACHER_PREFIX) else f"{TEACHER_PREFIX}{name}"

    @property
    def num_samples(self) -> int:
        return self.meta.num_samples

    @property
    def views(self) -> tuple[str, ...]:
        return self.meta.views

    def group(self, name: str) -> GroupView:
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

    def feature_codec(self, group: str) -> Int8Codec | None:
        """The ``feature_codec`` of a group (None: stored as floats), what :func:`cache.codec.dequantize`
        takes to decode the arrays of a ``raw=True`` read."""
        return self.group(group).meta.codec

    def _negative_scale(self, group: str, name: str, rows: np.ndarray) -> int | None:
        """The first row of ``rows`` (of ``group/name``) holding a negative int8 scale, or None. A
        scale is its token's largest magnitude, never below 0: a negative one would flip the token."""
        if name not in {scale_name(a) for a in _quantised(self.feature_codec(group))}:
            return None
        negative = (rows.reshape(rows.shape[0], -1) < 0).any(axis=1)
        return int(np.flatnonzero(negative)[0]) if negative.any() else None

    def _stored(self, wanted: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The stored arrays a read of ``wanted`` fetches: quantised arrays with their scales."""
        out: list[tuple[str, str]] = []
        for g in dict.fromkeys(g for g, _ in wanted):
            names = [n for gg, n in wanted if gg == g]
            out += [(g, n) for n in stored_arrays(self.feature_codec(g), names)]
        return out

    def _decoded(self, out: dict[str, np.ndarray], wanted: list[tuple[str, str]], raw: bool) -> dict[str, np.ndarray]:
        """Replace each quantised array of ``out`` by its decoding, float16 (``raw``: keep the stored
        int8 values, and their ``<array>_scale`` beside them). Scales that were not asked for are
        dropped after decoding."""
        if raw:
            return out
        asked = {f"{g}/{n}" for g, n in wanted}
        for g in dict.fromkeys(g for g, _ in wanted):
            codec = self.feature_codec(g)
            if codec is None:
                continue
            for n in codec.arrays:
                key, skey = f"{g}/{n}", f"{g}/{scale_name(n)}"
                if key in out:
                    out[key] = self._to_float16(g, n, decode_numpy(out[key], out[skey], codec))
                if skey in out and skey not in asked:
                    del out[skey]
        return out

    def _to_float16(self, group: str, name: str, x: np.ndarray) -> np.ndarray:
        """Decoded tokens as float16, the dtype of a float16 group (half the bytes of float32 to
        pin and copy); a CacheError, not infinities, for tokens beyond its range."""
        if x.size and np.abs(x).max() > np.finfo(np.float16).max:
            raise CacheError(f"group '{group}' of {self.root}: '{name}' holds values beyond float16's range; "
                             "read it with raw=True and decode it with cache.codec.dequantize")
        return x.astype(np.float16)

    def read_views(self, indices: Sequence[int] | np.ndarray, views: Sequence[int] | np.ndarray,
                   groups: Iterable[str] | None = None, *, fields: Iterable[str] | None = None,
                   raw: bool = False) -> dict[str, np.ndarray]:
        """Like ``read``, with one stored view per row: row ``i`` of every array is view
        ``views[i]`` of sample ``indices[i]``, shape ``(n, ...)`` (no view axis). Also returns
        ``out["view"]``. This generic version reads every view and picks; a backend that can read
        one view alone overrides it."""
        idx = self._check_indices(indices)
        v = self._check_views(views, idx)
        out = self.read(idx, groups=groups, fields=fields, raw=raw)
        rows = np.arange(idx.size)
        for k in [k for k in out if "/" in k]:
            out[k] = np.ascontiguousarray(out[k][rows, v])
        out["view"] = v
        return out

    @abc.abstractmethod
    def read(self, indices: Sequence[int] | np.ndarray, groups: Iterable[str] | None = None, *,
             fields: Iterable[str] | None = None, raw: bool = False) -> dict[str, np.ndarray]:
        """Rows at ``indices`` of the requested arrays, each ``(n, V, ...)``, plus ``label`` and ``index``.

        Teacher tokens of a quantised group are decoded to float16; with ``raw=True`` they come as
        stored: ``"<group>/patch"`` int8 and ``"<group>/patch_scale"`` float32 ``(..., T, 1)``, to
        be decoded by :func:`cache.codec.dequantize` with :meth:`feature_codec` (on the GPU)."""

    def read_block(self, start: int, stop: int, groups: Iterable[str] | None = None, *,
                   fields: Iterable[str] | None = None, raw: bool = False) -> dict[str, np.ndarray]:
        """Valid rows of the contiguous block ``[start, stop)``; ``out["index"]`` says which."""
        if not 0 <= start <= stop <= self.num_samples:
            raise CacheError(f"block [{start}, {stop}) is outside [0, {self.num_samples})")
        return self.read(np.arange(start, stop)[self.valid[start:stop]], groups=groups, fields=fields, raw=raw)

    @abc.abstractmethod
    def array_names(self, group: str) -> list[str]:
        """The arrays of an opened group, e.g. ``["patch", "cls"]`` for a teacher."""

    def _fields(self, groups: Iterable[str] | None, fields: Iterable[str] | None) -> list[tuple[str, str]]:
        """``(group, array)`` pairs to read: every array of the selected groups, or exactly the
        ``fields`` (``"<group>/<array>"`` keys as ``read`` returns them, e.g.
        ``"teachers/dinov2-vit-b/patch"``; a bare teacher name works as the group)."""
        if fields is None:  # a quantised array's scales come with it (see _stored)
            return [(g, name) for g in self._select(groups) for name in self.array_names(g)
                    if name not in {scale_name(a) for a in _quantised(self.feature_codec(g))}]
        if groups is not None:
            raise CacheError("read(): pass groups or fields, not both")
        out = []
        for f in fields:
            g, _, name = f.rpartition("/")
            g = self.resolve_group(g) if g else g
            if g not in self.groups or name not in self.array_names(g):
                known = ", ".join(f"{g}/{n}" for g in self.groups for n in self.array_names(g))
                raise CacheError(f"'{f}' is not an array of a group this reader opened (arrays: {known})")
            out.append((g, name))
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
        check_plan(self.root, self.meta)  # num_samples agrees with a file that has that many rows
        present = list_groups(self.root)
        if groups is None:
            wanted = [g for g in present if commit_path(self.root, g).exists()]
            if not wanted:
                raise CacheError(f"{self.root} has no committed group (was its precompute interrupted? run it again)")
        else:
            wanted = [self.resolve_group(g) for g in groups]
        self.verify_checksums = verify_checksums
        self._verified: set[tuple[str, int]] = set()  # v1 groups: shards hashed whole by this process
        self._records: dict[tuple[str, int], ShardRecord] = {}  # v1 groups: what their checks need
        self._tables: dict[tuple[str, int], dict[str, ChunkTable | None]] = {}  # v2 groups: by array
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.groups: dict[str, GroupInfo] = {}
        for g in wanted:
            self.groups[g] = self._open_group(g, present)
        whole = [g for g, info in self.groups.items() if not info.chunk_checked]
        if verify_checksums and whole:
            log.warning("%s: group(s) %s were written before per-chunk checksums (cache format v1): each loader process "
                        "hashes every shard it touches whole (about the whole cache per process and epoch); once `repa verify` "
                        "passes, --no-verify skips it", self.root, ", ".join(whole))
        manifest = read_manifest(self.root, self.meta, columns=["label", "status"])
        self.labels: np.ndarray = manifest.column("label").to_numpy().astype(np.int64)
        self.valid: np.ndarray = pc.not_equal(manifest.column("status"), "skipped").to_numpy(zero_copy_only=False)

    @functools.cached_property
    def keys(self) -> Sequence[str]:  # type: ignore[override]
        """Source key by cache index (read from the manifest when first asked for)."""
        return read_manifest(self.root, self.meta, columns=["key"]).column("key").to_pylist()

    @functools.cached_property
    def status(self) -> np.ndarray:  # type: ignore[override]
        """Outcome by cache index (read from the manifest when first asked for)."""
        return np.asarray(read_manifest(self.root, self.meta, columns=["status"]).column("status").to_pylist())

    # -- opening -------------------------------------------------------------------------------
    def _open_group(self, group: str, present: list[str]) -> GroupInfo:
        """Open a committed group, checking that every shard has a record and its stored objects
        (two listings of names; no record is read)."""
        if group not in present:
            have = ", ".join(present) or "none"
            raise CacheError(f"{self.root} has no group '{group}' (groups present: {have})")
        commit = commit_record(self.root, group)
        if commit is None:
            raise CacheError(f"group '{group}' of {self.root} is not committed (its precompute did not finish; run it again)")
        gmeta = group_meta(self.root, group)
        if commit["fingerprint_hash"] != gmeta.fingerprint_hash:
            raise CacheError(f"group '{group}' of {self.root}: commit record does not match its metadata")
        arrays = group_arrays(self.root, self.meta, group, gmeta)
        have_records = record_shards(self.root, self.meta, group)
        stored = (self.root / group).find()  # one listing instead of a lookup per shard object
        for shard in range(self.meta.num_shards):
            if shard not in have_records:
                raise CacheError(f"group '{group}' of {self.root}: shard {shard} has no record (damaged cache)")
        # A shard object the commit counted on may still be missing: its record says whether it
        # should exist, and that is read when the shard is; objects present cost no record read.
        for name, arr in arrays.items():
            missing = [s for s in range(self.meta.num_shards) if shard_key(arr, s) not in stored]
            for shard in missing:
                if self._record(group, shard).checksums.get(name) != "absent":
                    raise CacheError(f"group '{group}' of {self.root}: shard {shard} of '{name}' is missing")
        layouts = {name: chunk_layout(arr) for name, arr in arrays.items()}
        info = GroupInfo(gmeta, commit, arrays, layouts)
        return dataclasses.replace(info, arrays=self._open_arrays(group, info))

    def _open_arrays(self, group: str, info: GroupInfo) -> dict[str, zarr.Array]:
        """The group's arrays as this reader reads them: through a :class:`cache.chunks.CheckedStore`
        when it verifies a group written by format v2."""
        store = (self.root / group).zarr_store(read_only=True)
        if self.verify_checksums and info.chunk_checked:
            layouts = {name: layout for name, layout in info.layouts.items() if layout is not None}
            store = CheckedStore(store, layouts, functools.partial(self._table, group), self.meta.shard_size,
                                 f"group '{group}' of {self.root}")
        grp = zarr.open_group(store=store, mode="r")
        return {name: zarr_array(grp, name) for name in info.arrays}

    def group(self, name: str) -> GroupInfo:
        return self.groups[self.resolve_group(name)]

    def array_names(self, group: str) -> list[str]:
        return list(self.groups[group].arrays)

    def _this_process(self) -> None:
        """Reopen the arrays in a forked child (DataLoader workers): a remote store's client and
        event loop belong to the process that opened them."""
        if self._pid == os.getpid():
            return
        for g, info in self.groups.items():
            self.groups[g] = dataclasses.replace(info, arrays=self._open_arrays(g, info))
        self._pid = os.getpid()

    # -- reading -------------------------------------------------------------------------------
    def read(self, indices: Sequence[int] | np.ndarray, groups: Iterable[str] | None = None, *,
             fields: Iterable[str] | None = None, raw: bool = False) -> dict[str, np.ndarray]:
        """Rows at ``indices`` (any order, repeats allowed) of the requested groups (or only the
        ``fields``; quantised tokens decoded unless ``raw``, see :class:`ReaderBase`).

        Raises CacheError for an index out of range or of a skipped input.
        """
        self._this_process()
        idx = self._check_indices(indices)
        wanted = self._fields(groups, fields)
        self._check_shards_of(wanted, idx)
        stored = self._stored(wanted)
        rows = self._fetch([(g, name, idx, None) for g, name in stored])
        out = {f"{g}/{name}": r for (g, name), r in zip(stored, rows)}
        out = self._decoded(out, wanted, raw)
        out["label"] = self.labels[idx]
        out["index"] = idx
        return out

    def read_views(self, indices: Sequence[int] | np.ndarray, views: Sequence[int] | np.ndarray,
                   groups: Iterable[str] | None = None, *, fields: Iterable[str] | None = None,
                   raw: bool = False) -> dict[str, np.ndarray]:
        """Like ``read``, with one stored view per row (see :meth:`ReaderBase.read_views`). Reads
        only that view: where a chunk holds one view (the layout the writer uses) nothing else is
        decompressed, about half the work of ``read`` with two views; older caches with both views
        in a chunk read correctly, at the cost of ``read``."""
        self._this_process()
        idx = self._check_indices(indices)
        v = self._check_views(views, idx)
        wanted = self._fields(groups, fields)
        self._check_shards_of(wanted, idx)
        stored = self._stored(wanted)
        by_view = [(view, np.flatnonzero(v == view)) for view in np.unique(v).tolist()]
        rows = iter(self._fetch([(g, name, idx[sel], view) for g, name in stored for view, sel in by_view]))
        out: dict[str, np.ndarray] = {}
        for g, name in stored:
            arr = self.groups[g].arrays[name]
            data = np.empty((idx.size, *arr.shape[2:]), arr.dtype)
            for _, sel in by_view:
                data[sel] = next(rows)
            out[f"{g}/{name}"] = data
        out = self._decoded(out, wanted, raw)
        out["label"] = self.labels[idx]
        out["index"] = idx
        out["view"] = v
        return out

    def _fetch(self, jobs: list[tuple[str, str, np.ndarray, int | None]]) -> list[np.ndarray]:
        """Rows of several arrays at once. A job ``(group, array, indices, view)`` asks for the
        rows ``indices`` (any order, repeats allowed) of one array, all views (``view=None``) or
        one. Every run of consecutive indices becomes one zarr slice read, and the reads of all
        jobs are in flight together on zarr's event loop: file or object reads and decompression
        overlap (zarr runs both in threads), instead of paying one round trip per read. Plain
        slices, because zarr 3.1's orthogonal selection on sharded arrays computes an index per
        element, some 40x slower per sample (zarr-python #3829). Every row is checked finite."""

        async def one(arr: zarr.Array, idx: np.ndarray, view: int | None) -> np.ndarray:
            uniq, inverse = np.unique(idx, return_inverse=True)
            runs = np.split(uniq, np.flatnonzero(np.diff(uniq) != 1) + 1)
            sels = [slice(int(r[0]), int(r[-1]) + 1) for r in runs]
            parts = await asyncio.gather(*(arr.async_array.getitem(s if view is None else (s, view)) for s in sels))
            return np.concatenate(parts)[inverse.reshape(-1)]

        async def all_jobs() -> list[Any]:
            return await asyncio.gather(
                *(one(self.groups[g].arrays[name], idx, view) for g, name, idx, view in jobs if idx.size),
                return_exceptions=True,
            )

        fetched = iter(zarr_sync(all_jobs()) if any(job[2].size for job in jobs) else [])
        out = []
        for g, name, idx, view in jobs:
            arr = self.groups[g].arrays[name]
            if not idx.size:
                out.append(np.empty((0, *(arr.shape[1:] if view is None else arr.shape[2:])), arr.dtype))
                continue
            rows = next(fetched)
            if isinstance(rows, BaseException):
                self._raise_unreadable(g, name, idx, rows)
            self._check_finite(g, name, rows, idx)
            out.append(rows)
        return out

    # -- checks against the shard records ------------------------------------------------------
    def _check_shards_of(self, wanted: list[tuple[str, str]], idx: np.ndarray) -> None:
        """Before a read: the records of the shards it touches (read concurrently, once per process),
        and for a v1 group each of those shards hashed whole on first touch."""
        if not self.verify_checksums:
            return
        shards = {self.meta.shard_of(int(i)) for i in np.unique(idx)}
        for g in dict.fromkeys(g for g, _ in wanted):
            if self.groups[g].chunk_checked:
                self._load_records(g, [s for s in shards if (g, s) not in self._tables])
            else:
                self._check_shards(g, shards)

    def _check_shards(self, group: str, shards: set[int]) -> None:
        """Hash every not yet verified shard of a v1 group whole against its record."""
        todo = sorted(s for s in shards if (group, s) not in self._verified)
        self._load_records(group, [s for s in todo if (group, s) not in self._records])
        for shard in todo:
            problem = check_shard(self.groups[group].arrays, self._records[(group, shard)])  # v1: no chunk layouts
            if problem:
                raise CacheError(f"group '{group}' of {self.root}: shard {shard} {problem}")
            with self._lock:
                self._verified.add((group, shard))

    def _load_records(self, group: str, shards: Iterable[int]) -> None:
        """Read the records of ``shards`` (concurrently where the storage allows) and keep what the
        checks need: the chunk checksums of a v2 group, the whole-object checksums of a v1 group."""
        paths = {s: record_path(self.root, group, s) for s in shards}
        if not paths:
            return
        raw = self.root.read_many(paths.values())
        info = self.groups.get(group)
        for shard, path in paths.items():
            if path not in raw:
                raise CacheError(f"group '{group}' of {self.root}: shard {shard} has no record (damaged cache)")
            rec = self._parse_record(group, shard, raw[path])
            with self._lock:
                if info is not None and info.chunk_checked:
                    self._tables[(group, shard)] = self._chunk_tables(group, shard, rec, info)
                else:  # a v1 group, or one being opened: what check_shard reads, not the outcomes and input hashes
                    self._records[(group, shard)] = dataclasses.replace(rec, outcomes=[], input_sha256=[], chunks={})

    def _parse_record(self, group: str, shard: int, raw: bytes) -> ShardRecord:
        rec = parse_record(group, shard, raw)
        if rec is None:
            raise CacheError(f"group '{group}' of {self.root}: shard {shard} has an unreadable or foreign record (damaged cache)")
        return rec

    def _chunk_tables(self, group: str, shard: int, rec: ShardRecord, info: GroupInfo) -> dict[str, ChunkTable | None]:
        """A v2 record's chunk table of each array (None: the record says the shard has no object)."""
        tables: dict[str, ChunkTable | None] = {}
        for name, layout in info.layouts.items():
            assert layout is not None
            if rec.checksums.get(name) == "absent":
                tables[name] = None
                continue
            try:
                tables[name] = ChunkTable.from_json(rec.chunks.get(name), layout)
            except ValueError as e:
                raise CacheError(f"group '{group}' of {self.root}: shard {shard} has a record without usable chunk checksums "
                                 f"for '{name}' ({e}; damaged cache)") from None
        return tables

    def _record(self, group: str, shard: int) -> ShardRecord:
        """The record of one shard of a group being opened (or of a v1 group), read when first asked for."""
        if (group, shard) not in self._records:
            self._load_records(group, [shard])
        return self._records[(group, shard)]

    def _table(self, group: str, name: str, shard: int) -> ChunkTable | None:
        """The recorded chunk table of one shard object (:class:`cache.chunks.CheckedStore` asks)."""
        tables = self._tables.get((group, shard))
        if tables is None:  # reads are preceded by _check_shards_of; this covers any other path
            self._load_records(group, [shard])
            tables = self._tables[(group, shard)]
        return tables[name]

    def _raise_unreadable(self, group: str, name: str, idx: np.ndarray, error: BaseException) -> None:
        """A read that failed: a CacheError naming the damaged shard (a storage failure surfaces as
        itself while the shard is checked)."""
        if not isinstance(error, Exception):  # KeyboardInterrupt and the like
            raise error
        if isinstance(error, CacheError):  # a check against the records, which names the shard already
            raise error
        shards = sorted({self.meta.shard_of(int(i)) for i in idx})
        for shard in shards:  # name the shard that is at fault (an error path: hashing it whole is fine)
            rec = self._parse_record(group, shard, record_path(self.root, group, shard).read_bytes())
            problem = check_shard(self.groups[group].arrays, rec, self.groups[group].layouts)
            if problem:
                raise CacheError(f"group '{group}' of {self.root}: shard {shard} {problem}") from error
        raise CacheError(f"group '{group}' of {self.root}: shards {shards} of '{name}' do not decode: {error}") from error

    def _check_finite(self, group: str, name: str, rows: np.ndarray, idx: np.ndarray) -> None:
        if rows.size == 0:
            return
        flat = rows.reshape(rows.shape[0], -1)
        # int8 tokens: the fill value marks what was never written, as NaN does for floats
        finite = (flat != MISSING_INT8).all(axis=1) if flat.dtype == np.int8 else np.isfinite(flat).all(axis=1)
        if not finite.all():
            i = int(idx[np.flatnonzero(~finite)[0]])
            raise CacheError(
                f"group '{group}' of {self.root}: shard {self.meta.shard_of(i)} has missing or non-finite data "
                f"in '{name}' at index {i} (damaged cache; run `repa verify`)"
            )
        row = self._negative_scale(group, name, rows)
        if row is not None:
            i = int(idx[row])
            raise CacheError(f"group '{group}' of {self.root}: shard {self.meta.shard_of(i)} has negative scales "
                             f"in '{name}' at index {i} (damaged cache; run `repa verify`)")


def parse_record(group: str, shard: int, raw: bytes) -> ShardRecord | None:
    """The record of ``shard`` of ``group`` from a file's bytes, or None when they are not one (not
    JSON, other fields, another shard's record)."""
    try:
        rec = ShardRecord.from_json(json.loads(raw))
    except (TypeError, ValueError, AttributeError):
        return None
    fields_ok = isinstance(rec.checksums, dict) and isinstance(rec.stored_bytes, dict) and isinstance(rec.chunks, dict)
    return rec if fields_ok and (rec.group, rec.shard) == (group, shard) else None


def check_shard(arrays: dict[str, zarr.Array], rec: ShardRecord | None,
                layouts: dict[str, ChunkLayout | None] | None = None) -> str | None:
    """None when a shard's stored objects hash (sha256, whole) to its record and, for arrays with a
    chunk layout in ``layouts`` (format v2), carry the chunk checksums it lists; else what is wrong.
    ``arrays`` read their store as stored (a :class:`cache.chunks.CheckedStore` also checks)."""
    if rec is None:
        return "has no record"
    for name, arr in arrays.items():
        raw = read_shard_bytes(arr, rec.shard)
        want = rec.checksums.get(name)
        if raw is None:
            if want != "absent":
                return f"of '{name}' is missing"
            continue
        if want == "absent":
            return f"of '{name}' holds data where none was written"
        if hashlib.sha256(raw).hexdigest() != want:
            written = rec.stored_bytes.get(name)
            if len(raw) != written:
                return f"of '{name}' fails its checksum: {len(raw)} bytes stored where {written} were written (truncated or replaced)"
            return f"of '{name}' fails its checksum: its {len(raw)} bytes differ from those written (damaged bytes)"
        layout = (layouts or {}).get(name)
        if layout is not None:
            try:
                listed = ChunkTable.from_json(rec.chunks.get(name), layout)
            except ValueError as e:
                return f"has a record without usable chunk checksums for '{name}' ({e})"
            if ChunkTable.of_object(raw, layout) != listed:
                return f"has a record whose chunk checksums for '{name}' differ from the stored object's (damaged record)"
    return None
