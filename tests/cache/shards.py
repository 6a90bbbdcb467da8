"""Test helpers that look inside a stored shard object (format v2): where its chunks are."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from repa_cache.cache import writer
from repa_cache.cache.chunks import CRC_BYTES, ChunkLayout


def index_entries(raw: bytes, num_chunks: int) -> np.ndarray:
    """(num_chunks, 2) offsets and lengths from the index at the end of a shard object."""
    layout = ChunkLayout((num_chunks,))
    return np.frombuffer(raw[-layout.index_bytes:-CRC_BYTES], dtype="<u8").reshape(num_chunks, 2).copy()


def num_chunks_of(f: Path) -> int:
    """Chunks per shard of the array a shard object (``<array>/c/<shard>/0/...``) belongs to, from its zarr.json."""
    array = next(p for p in f.parents if p.name == "c").parent
    meta = json.loads((array / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["chunk_shape"]
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    return int(np.prod([s // c for s, c in zip(shard, inner)]))


def chunk_span(f: Path, position: int) -> tuple[int, int]:
    """Byte range [start, stop) of inner chunk ``position`` (C order over sample, view) of a shard object."""
    offset, length = index_entries(f.read_bytes(), num_chunks_of(f))[position]
    return int(offset), int(offset + length)


@contextlib.contextmanager
def written_as_v1(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside: the writer stores caches as format v1 did (chunks without crc32c, records without
    chunk tables, the root's format version left as given)."""
    with monkeypatch.context() as m:
        m.setattr(writer, "chunk_codecs", lambda codec: (writer.make_codec(codec),))
        m.setattr(writer, "require_format", lambda root, version=0: None)
        yield
