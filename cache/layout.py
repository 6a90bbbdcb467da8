"""Where the stored pieces of a cache are, for both sides of it: the zarr groups, the object that
holds one shard of an array, and the shard records.

The writer (:mod:`repa_cache.cache.writer`) and every reader (:mod:`~repa_cache.cache.reader`,
``verify``, ``copy``, ``stats``) find the same objects through these helpers, so the read side
never needs to import the write side.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import CacheMeta, ShardRecord, record_path
from repa_cache.cache.storage import StorePath, store_path

#: Chunks zarr decodes together within one read. Its default (1) costs about twice the time on
#: reads of whole shards of small chunks; the commands that read whole shards (verify, stats,
#: export-wds, transcoding copies) run under :func:`bulk_reads`.
BULK_BATCH = 128


@contextlib.contextmanager
def bulk_reads() -> Iterator[None]:
    """zarr set up for reading whole shards (usable as a decorator): arrays opened and read inside
    decode :data:`BULK_BATCH` chunks at a time."""
    with zarr.config.set({"codec_pipeline.batch_size": BULK_BATCH}):
        yield


def open_zarr(root: StorePath, mode: Literal["r", "r+"] = "r") -> zarr.Group:
    """The zarr group at ``root`` (a cache root or one of its groups), local or remote."""
    return zarr.open_group(store=root.zarr_store(read_only=mode == "r"), mode=mode)


def zarr_array(group: zarr.Group, name: str) -> zarr.Array:
    """Array ``name`` of a zarr group; a CacheError when the store holds something else there."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise CacheError(f"'{name}' of {group.store} is a zarr group where an array is expected (damaged cache)")
    return node


def shard_key(array: zarr.Array, shard: int) -> str:
    """Store key of one zarr shard object (= one cache shard) of ``array``."""
    coords = (shard,) + (0,) * (array.ndim - 1)  # shards split the sample axis only
    return f"{array.path}/{array.metadata.encode_chunk_key(coords)}"


def read_shard_bytes(array: zarr.Array, shard: int) -> bytes | None:
    """Raw stored bytes of one shard, or None when the object is absent."""
    buf = sync(array.store.get(shard_key(array, shard), prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def record_shards(root: StorePath | Path, meta: CacheMeta, group: str) -> set[int]:
    """The shards of a group that have a record (one listing of names; no record is read)."""
    root = store_path(root)
    names = {p.name for p in record_path(root, group, 0).parent.iterdir()}
    return {s for s in range(meta.num_shards) if record_path(root, group, s).name in names}


def read_record(root: StorePath | Path, group: str, shard: int) -> ShardRecord:
    """One shard record (FileNotFoundError when it does not exist)."""
    return ShardRecord.from_json(record_path(store_path(root), group, shard).read_json())


def load_records(root: StorePath | Path, meta: CacheMeta, group: str, shards: Iterable[int] | None = None) -> dict[int, ShardRecord]:
    """The shard records present for a group (of ``shards``, default all), by shard number: one
    listing, then concurrent reads. Holds every record it returns: read large groups in batches."""
    root = store_path(root)
    folder = record_path(root, group, 0).parent
    names = {p.name for p in folder.iterdir()}
    paths = {s: record_path(root, group, s) for s in (range(meta.num_shards) if shards is None else shards)}
    present = [p for p in paths.values() if p.name in names]
    raw = folder.read_many(present)
    return {s: ShardRecord.from_json(json.loads(raw[p])) for s, p in paths.items() if p in raw}


__all__ = ["BULK_BATCH", "bulk_reads", "load_records", "open_zarr", "read_record", "read_shard_bytes", "record_shards", "shard_key"]
