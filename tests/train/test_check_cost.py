"""What the trainer's default check costs one loader process: it checksums the bytes it reads and
reads what it checks, no more (format v2); caches written before (v1) still hash whole shards.

Bytes read are counted from the process's read system calls (``rchar`` in /proc/self/io), bytes
checksummed by counting what goes through crc32c and sha256, and the bytes the batches need from
the shard indices of the chunks they hold.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pyarrow as pa
import pytest

from repa_cache.cache import reader as reader_module
from repa_cache.cache.format import LATENTS, ArraySpec, CacheMeta, GroupMeta, record_path
from repa_cache.cache.layout import shard_key
from repa_cache.cache.writer import DEFAULT_CODEC, commit_group, create_cache, create_group, write_shard
from repa_cache.train.data import CacheBatches, DataConfig

from ..cache.shards import index_entries, num_chunks_of, written_as_v1

N, SHARD, BATCH, STEPS = 512, 64, 16, 8
PAGE = 4096 + 128
TEACHER = "teachers/t"

pytestmark = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts read system calls from /proc/self/io (Linux)")


def _write(root: Path) -> None:
    """A cache whose chunks are kilobytes (as real ones are hundreds of them), in the writer's layout."""
    views = ("orig", "hflip")
    meta = CacheMeta(2, "test", N, SHARD, 64, "adm-center", views, 0, ("a", "b"), {"kind": "synthetic"}, {"x": 1})
    create_cache(root, meta, pa.table({"index": np.arange(N), "key": [f"k{i}" for i in range(N)],
                                       "label": pa.array(np.arange(N) % 2, pa.int32())}))
    rng = np.random.default_rng(0)
    groups = [
        GroupMeta(LATENTS, "latents", {"scaling_factor": 0.5}, tuple(ArraySpec(n, (4, 8, 8), "float32", DEFAULT_CODEC) for n in ("mean", "std")),
                  {"group": LATENTS}),
        GroupMeta(TEACHER, "teacher", {"num_tokens": 64, "dim": 64}, (ArraySpec("patch", (64, 64), "float16", DEFAULT_CODEC),
                                                                       ArraySpec("cls", (64,), "float16", DEFAULT_CODEC)), {"group": TEACHER}),
    ]
    for g in groups:
        create_group(root, meta, g)
        for s in range(meta.num_shards):
            data = {a.name: rng.standard_normal((SHARD, 2, *a.sample_shape)).astype(a.dtype) for a in g.arrays}
            write_shard(root, meta, g, s, data, [["ok", "", 64, 64]] * SHARD, "w" * 64)
        commit_group(root, meta, g)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


class _Counted:
    """Counts the bytes given to crc32c (zarr's codecs: each call's size) and to sha256 (the
    whole-shard check)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.crc: list[int] = []
        self.sha = 0
        crc32c, sha256 = google_crc32c.value, hashlib.sha256

        def value(data: Any) -> int:
            self.crc.append(memoryview(data).nbytes)
            return crc32c(data)

        counter = self

        class Sha:
            def __init__(self, data: bytes = b"") -> None:
                self._h = sha256()
                self.update(data)

            def update(self, data: bytes) -> None:
                counter.sha += len(data)
                self._h.update(data)

            def hexdigest(self) -> str:
                return self._h.hexdigest()

        monkeypatch.setattr(google_crc32c, "value", value)
        monkeypatch.setattr(reader_module.hashlib, "sha256", Sha)


def _run(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CacheBatches, dict[str, int]]:
    """K steps of one loader process (fields: latents and the teacher's patch tokens, one view
    each), returning what it read, checksummed and needed."""
    import zarr

    ds = CacheBatches(DataConfig(str(root), ("t",), BATCH, num_workers=0, verify_checksums=True))
    counted = _Counted(monkeypatch)
    before = _rchar()
    batches = [ds[step] for step in range(STEPS)]
    read = _rchar() - before
    # what the batches hold, as stored: each (sample, view) chunk of mean, std and patch, and the
    # index and record of every shard they touch (once per process)
    index = records = 0
    chunks: list[int] = []  # stored size of each chunk the batches hold
    index_size = 0
    arrays_touched: set[tuple[str, str, int]] = set()
    groups_touched: set[tuple[str, int]] = set()
    for b in batches:
        for i, v in zip(b["index"].tolist(), b["view"].tolist()):
            shard, row = divmod(i, SHARD)
            for group, name in ((LATENTS, "mean"), (LATENTS, "std"), (TEACHER, "patch")):
                f = root / group / shard_key(zarr.open_group(str(root / group), mode="r")[name], shard)
                n = num_chunks_of(f)
                chunks.append(int(index_entries(f.read_bytes(), n)[2 * row + v, 1]))
                index_size = 16 * n + 4
                if (group, name, shard) not in arrays_touched:
                    arrays_touched.add((group, name, shard))
                    index += 16 * n + 4
                if (group, shard) not in groups_touched:
                    groups_touched.add((group, shard))
                    records += record_path(root, group, shard).stat().st_size
    return ds, {"read": read, "crc": counted.crc, "sha": counted.sha, "chunks": chunks, "needed": sum(chunks), "index": index,
                "index_size": index_size, "records": records, "touched": len(arrays_touched) + len(groups_touched)}


def test_the_trainer_checksums_what_it_reads_and_reads_what_it_checks(tmp_path, monkeypatch):
    root = tmp_path / "c"
    _write(root)
    _, c = _run(root, monkeypatch)
    assert c["sha"] == 0  # no whole-shard hashing
    # crc32c runs over exactly the chunks fetched, each once (less its own 4 checksum bytes), and
    # over the shard index once per zarr read call, at most one per chunk (zarr checks it each time;
    # after a process's first read of a shard it comes from memory, not from storage)
    crc, chunks = Counter(c["crc"]), Counter(n - 4 for n in c["chunks"])
    index_checks = crc - chunks
    assert crc == chunks + index_checks and set(index_checks) == {c["index_size"] - 4}
    assert 0 < index_checks.total() <= len(c["chunks"])
    # storage is read for the chunks, one index per shard and array, one record per shard and group,
    # nothing else (zarr's local store reads through a buffer: up to a page more per read call)
    reads = len(c["chunks"]) + c["touched"]
    assert c["needed"] + c["index"] <= c["read"] <= 1.05 * (c["needed"] + c["index"] + c["records"]) + PAGE * reads


def test_a_v1_cache_still_hashes_whole_shards(tmp_path, monkeypatch):
    root = tmp_path / "v1"
    with written_as_v1(monkeypatch):
        _write(root)
    _, c = _run(root, monkeypatch)
    assert set(c["crc"]) == {c["index_size"] - 4}  # the shard index alone has a crc32c in v1
    touched = {(i // SHARD) for i in range(N)}
    assert c["sha"] > 5 * c["needed"] and len(touched) == N // SHARD  # every object of every shard touched, hashed whole
