"""Integrity at the cost of what is read: per-chunk checksums, bound to the shard records.

Arrays written by format v2 store every inner chunk with zarr's ``crc32c`` codec as the last
step of its codec chain, and the sharding codec keeps its index (offset and length of every inner
chunk) with a crc32c of its own. zarr checks both whenever it decodes. That proves that the bytes
of a chunk are the bytes its writer stored, but not that they are the bytes *this cache* stored at
that place: a shard object swapped with another one, or left over from an earlier write, checks
itself perfectly well. So each shard record keeps a :class:`ChunkTable` per array: the crc32c of
the shard's index and of each of its chunks, as stored. :class:`CheckedStore` sits between zarr
and the storage of one group and compares what zarr fetches with the records:

* the index (one small read per shard and process; kept, so zarr's later reads of it cost no I/O)
  must carry the crc32c of the index the writer stored, and zarr then checks the index bytes;
* each chunk zarr fetches must be one the index lists, whole, and end in the crc32c the record
  holds for that position; zarr then checks the chunk's bytes against it while decoding.

Every byte the reader fetches is checksummed once, by zarr, and nothing else is read but the
records (once per shard and process). A mismatch raises :class:`CacheError` naming the shard (and
the sample and view of a chunk). Whole-object sha256 checksums stay in the records, for ``repa
verify`` and ``repa cache copy``; groups written before v2 have no chunk checksums and are
checked with those (:func:`repa_cache.cache.reader.check_shard`).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from repa_cache.cache.errors import CacheError

CRC_BYTES = 4
_EMPTY = np.uint64(2**64 - 1)  # offset and length of a chunk the index lists as absent
#: verified shard indices one group's store keeps per process (8 KiB each at 256 samples x 2 views)
INDEX_CACHE_ENTRIES = 512


@dataclass(frozen=True)
class ChunkLayout:
    """How an array of a v2 group is sharded: inner chunks per shard, in C order over the chunk
    grid of a shard (sample, view, ...)."""

    chunks_per_shard: tuple[int, ...]

    @property
    def num_chunks(self) -> int:
        return math.prod(self.chunks_per_shard)

    @property
    def index_bytes(self) -> int:
        """Size of the shard index: offset and length (two little-endian uint64) per chunk, then its crc32c."""
        return 16 * self.num_chunks + CRC_BYTES

    def where(self, shard: int, position: int, shard_size: int) -> str:
        """"sample I view V" of a chunk position of a shard."""
        coords = np.unravel_index(position, self.chunks_per_shard)
        sample = shard * shard_size + int(coords[0])
        return f"sample {sample} view {int(coords[1])}" if len(coords) > 1 and self.chunks_per_shard[1] > 1 else f"sample {sample}"


def chunk_layout(array: zarr.Array) -> ChunkLayout | None:
    """The layout of an array whose inner chunks and shard index carry crc32c checksums (written by
    format v2), else None (an array written before, checked with whole-shard sha256)."""
    codecs = array.metadata.codecs if hasattr(array.metadata, "codecs") else ()
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    if not sharding.codecs or not isinstance(sharding.codecs[-1], Crc32cCodec):
        return None
    index = sharding.index_codecs
    if (sharding.index_location != ShardingCodecIndexLocation.end or len(index) != 2
            or not isinstance(index[0], BytesCodec) or str(getattr(index[0].endian, "value", index[0].endian)) != "little"
            or not isinstance(index[1], Crc32cCodec)):
        return None
    shards, inner = array.shards, sharding.chunk_shape
    if shards is None or len(inner) != len(shards) or any(s % c for s, c in zip(shards, inner)):
        return None
    return ChunkLayout(tuple(s // c for s, c in zip(shards, inner)))


def _index_entries(index: bytes | np.ndarray, layout: ChunkLayout) -> np.ndarray:
    """(num_chunks, 2) uint64 offsets and lengths of a shard index (its crc32c excluded); a view."""
    return np.frombuffer(index, dtype="<u8", count=2 * layout.num_chunks).reshape(layout.num_chunks, 2)


@dataclass(frozen=True)
class ChunkTable:
    """What a shard record keeps of one stored shard object: the crc32c of its index and of each
    inner chunk (4 bytes each, as stored; zero for a chunk that was not written)."""

    index_crc: bytes
    chunk_crc: bytes  # num_chunks x 4 bytes, in chunk order

    @classmethod
    def of_object(cls, raw: bytes, layout: ChunkLayout) -> ChunkTable:
        """The table of a stored shard object (its bytes as written)."""
        if len(raw) < layout.index_bytes:
            raise ValueError(f"a shard object of {len(raw)} bytes cannot hold an index of {layout.index_bytes}")
        index = raw[-layout.index_bytes:]
        crcs = bytearray(CRC_BYTES * layout.num_chunks)
        for pos, (offset, length) in enumerate(_index_entries(index, layout)):
            if offset == _EMPTY:
                continue
            end = int(offset) + int(length)
            if length < CRC_BYTES or end > len(raw) - layout.index_bytes:
                raise ValueError(f"the index lists chunk {pos} at [{int(offset)}, {end}), outside the object")
            crcs[CRC_BYTES * pos: CRC_BYTES * (pos + 1)] = raw[end - CRC_BYTES: end]
        return cls(index[-CRC_BYTES:], bytes(crcs))

    def crc(self, position: int) -> bytes:
        return self.chunk_crc[CRC_BYTES * position: CRC_BYTES * (position + 1)]

    def to_json(self) -> dict[str, str]:
        return {"index_crc32c": self.index_crc.hex(), "chunk_crc32c": self.chunk_crc.hex()}

    @classmethod
    def from_json(cls, d: Any, layout: ChunkLayout) -> ChunkTable:
        """The table of a record read from a file, checked to fit ``layout`` (ValueError otherwise)."""
        if not isinstance(d, dict) or not isinstance(d.get("index_crc32c"), str) or not isinstance(d.get("chunk_crc32c"), str):
            raise ValueError("a chunk table needs 'index_crc32c' and 'chunk_crc32c' hex strings")
        if len(d["index_crc32c"]) != 2 * CRC_BYTES or len(d["chunk_crc32c"]) != 2 * CRC_BYTES * layout.num_chunks:
            raise ValueError(f"a chunk table of this array has {layout.num_chunks} chunk checksums")
        return cls(bytes.fromhex(d["index_crc32c"]), bytes.fromhex(d["chunk_crc32c"]))


#: (array name, shard) -> its record's table, or None when the record says the object is absent
TableLookup = Callable[[str, int], "ChunkTable | None"]


class CheckedStore(WrapperStore[Store]):
    """One group's store as the trainer reads it: every shard object zarr fetches is checked
    against the shard records (see the module docstring). Read-only; other keys pass through.

    ``layouts`` maps array name to its :class:`ChunkLayout`; ``table(name, shard)`` returns the
    record's :class:`ChunkTable` (None: the record says the shard has no object, every row skipped);
    ``describe`` names the group in messages. Verified indices are kept per process (at most
    :data:`INDEX_CACHE_ENTRIES`), so zarr, which reads a shard's index on every access, pays for it
    once.
    """

    def __init__(self, store: Store, layouts: dict[str, ChunkLayout], table: TableLookup, shard_size: int, describe: str) -> None:
        super().__init__(store)
        self.layouts, self.table, self.shard_size, self.describe = layouts, table, shard_size, describe
        self._indices: OrderedDict[tuple[str, int], tuple[Buffer, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def _with_store(self, store: Store) -> CheckedStore:
        return CheckedStore(store, self.layouts, self.table, self.shard_size, self.describe)

    def _shard_of(self, key: str) -> tuple[str, int] | None:
        """(array, shard) of a shard object's key (``<array>/c/<shard>/0/...``), else None."""
        name, _, rest = key.partition("/c/")
        if name not in self.layouts or not rest:
            return None
        head, _, tail = rest.partition("/")
        if not head.isdigit() or any(p != "0" for p in tail.split("/") if tail):
            return None
        return name, int(head)

    def _fail(self, name: str, shard: int, what: str) -> CacheError:
        return CacheError(f"{self.describe}: shard {shard} of '{name}' {what} (damaged cache; run `repa verify`)")

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None) -> Buffer | None:
        where = self._shard_of(key)
        if where is None:
            return await self._store.get(key, prototype, byte_range)
        name, shard = where
        layout = self.layouts[name]
        table = self.table(name, shard)
        if byte_range is None:  # the whole object (zarr reads every chunk of the shard)
            buf = await self._store.get(key, prototype)
            if buf is not None:
                self._check_object(name, shard, buf.to_bytes(), layout, table)
            elif table is not None:
                raise self._fail(name, shard, "is missing")
            return buf
        if isinstance(byte_range, SuffixByteRequest) and byte_range.suffix == layout.index_bytes:
            got = await self._index(key, name, shard, layout, table, prototype)
            return None if got is None else got[0]
        if isinstance(byte_range, RangeByteRequest):
            got = await self._index(key, name, shard, layout, table, prototype)
            if got is None or table is None:
                raise self._fail(name, shard, "is missing")
            entries = got[1]
            hits = np.flatnonzero(entries[:, 0] == byte_range.start)
            if not hits.size or int(entries[hits[0], 1]) != byte_range.end - byte_range.start:
                raise self._fail(name, shard, f"was asked for bytes [{byte_range.start}, {byte_range.end}) its index does not list")
            pos = int(hits[0])
            buf = await self._store.get(key, prototype, byte_range)
            if buf is None or len(buf) != byte_range.end - byte_range.start:
                raise self._fail(name, shard, f"is truncated (chunk of {layout.where(shard, pos, self.shard_size)})")
            if buf.as_numpy_array()[-CRC_BYTES:].tobytes() != table.crc(pos):  # no copy of the chunk
                raise self._fail(name, shard, f"holds another chunk than its record lists for {layout.where(shard, pos, self.shard_size)} "
                                              "(a swapped or stale shard)")
            return buf
        raise self._fail(name, shard, f"was read with an unexpected byte range {byte_range!r}")

    async def _index(self, key: str, name: str, shard: int, layout: ChunkLayout, table: ChunkTable | None,
                     prototype: BufferPrototype) -> tuple[Buffer, np.ndarray] | None:
        """The shard's index, checked against the record (read once per process), and its entries
        (offset, length per chunk position); None when the object is absent as its record says."""
        with self._lock:
            got = self._indices.get((name, shard))
            if got is not None:
                self._indices.move_to_end((name, shard))
                return got
        buf = await self._store.get(key, prototype, SuffixByteRequest(layout.index_bytes))
        if buf is None:
            if table is not None:
                raise self._fail(name, shard, "is missing")
            return None
        if table is None:
            raise self._fail(name, shard, "holds data where none was written")
        index = buf.as_numpy_array()  # a view: the cache keeps one copy of each index, the buffer zarr gets
        if index.size != layout.index_bytes or index[-CRC_BYTES:].tobytes() != table.index_crc:
            raise self._fail(name, shard, "is not the object its record describes (its index differs: a swapped, stale or truncated shard)")
        entries = _index_entries(index, layout)
        with self._lock:
            self._indices[(name, shard)] = (buf, entries)
            while len(self._indices) > INDEX_CACHE_ENTRIES:
                self._indices.popitem(last=False)
        return buf, entries

    def _check_object(self, name: str, shard: int, raw: bytes, layout: ChunkLayout, table: ChunkTable | None) -> None:
        if table is None:
            raise self._fail(name, shard, "holds data where none was written")
        try:
            have = ChunkTable.of_object(raw, layout)
        except ValueError:
            have = None
        if have is None or have.index_crc != table.index_crc:
            raise self._fail(name, shard, "is not the object its record describes (its index differs: a swapped, stale or truncated shard)")
        for pos in range(layout.num_chunks):
            if have.crc(pos) != table.crc(pos):
                raise self._fail(name, shard, f"holds another chunk than its record lists for {layout.where(shard, pos, self.shard_size)} "
                                              "(a swapped or stale shard)")


__all__ = ["INDEX_CACHE_ENTRIES", "CheckedStore", "ChunkLayout", "ChunkTable", "chunk_layout"]
