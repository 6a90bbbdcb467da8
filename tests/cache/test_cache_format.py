"""Writer/reader/verify of the cache format on synthetic data (no models): round trips, commit
discipline, damage detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from repa_cache.cache.errors import CacheError
from repa_cache.cache.format import (
    FORMAT_VERSION,
    LATENTS,
    ArraySpec,
    CacheMeta,
    GroupMeta,
    commit_path,
    fingerprint_diff,
    record_path,
)
from repa_cache.cache.layout import shard_key
from repa_cache.cache.reader import CacheReader
from repa_cache.cache.verify import VerifyReport, verify_cache
from repa_cache.cache.writer import DEFAULT_CODEC, commit_group, create_cache, create_group, write_shard

from ..cache.shards import chunk_span

N, SHARD, VIEWS = 10, 4, ("orig", "hflip")
SKIPPED = {5}  # cache index of an input that failed to decode


def _meta() -> CacheMeta:
    return CacheMeta(
        format_version=FORMAT_VERSION,
        code_version="test",
        num_samples=N,
        shard_size=SHARD,
        resolution=32,
        crop="adm-center",
        views=VIEWS,
        seed=0,
        class_names=("a", "b", "c"),
        source={"kind": "synthetic", "root": "-"},
        base_fingerprint={"listing": "x", "num_samples": N},
    )


def _groups() -> list[GroupMeta]:
    lat = GroupMeta(LATENTS, "latents", {"id": "synthetic", "scaling_factor": 0.5},
                    (ArraySpec("mean", (4, 4, 4), "float32", DEFAULT_CODEC), ArraySpec("std", (4, 4, 4), "float32", DEFAULT_CODEC)),
                    {"group": LATENTS, "v": 1})
    tea = GroupMeta("teachers/t", "teacher", {"name": "t", "num_tokens": 4, "dim": 8},
                    (ArraySpec("patch", (4, 8), "float16", DEFAULT_CODEC), ArraySpec("cls", (8,), "float16", DEFAULT_CODEC)),
                    {"group": "teachers/t", "v": 1})
    return [lat, tea]


def _data(meta: CacheMeta, g: GroupMeta, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = {}
    for a in g.arrays:
        x = rng.normal(size=(N, len(VIEWS), *a.sample_shape)).astype(a.dtype)
        x[sorted(SKIPPED)] = np.nan
        out[a.name] = x
    return out


def _outcomes(start: int, stop: int) -> list[list]:
    return [["skipped", "corrupt", 0, 0] if i in SKIPPED else ["ok", "", 40, 30] for i in range(start, stop)]


def build(root: Path, commit: bool = True) -> dict[str, dict[str, np.ndarray]]:
    meta = _meta()
    plan = pa.table({"index": np.arange(N), "key": [f"k{i}" for i in range(N)], "label": pa.array(np.arange(N) % 3, pa.int32())})
    create_cache(root, meta, plan)
    truth = {}
    for gi, g in enumerate(_groups()):
        create_group(root, meta, g)
        data = _data(meta, g, seed=gi)
        truth[g.group] = data
        for s in range(meta.num_shards):
            a, b = meta.shard_range(s)
            write_shard(root, meta, g, s, {k: v[a:b] for k, v in data.items()}, _outcomes(a, b), "w" * 64)
        if commit:
            commit_group(root, meta, g)
    return truth


@pytest.fixture()
def cache(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "c"
    return root, build(root)


def test_round_trip_bit_exact_random_access_and_blocks(cache):
    root, truth = cache
    r = CacheReader(root)
    assert r.num_samples == N and r.views == VIEWS
    assert list(r.valid_indices()) == [i for i in range(N) if i not in SKIPPED]
    idx = [9, 0, 3, 3, 7]  # any order, repeats, across shards
    got = r.read(idx)
    for g, arrays in truth.items():
        for name, x in arrays.items():
            np.testing.assert_array_equal(got[f"{g}/{name}"], x[idx])
            assert got[f"{g}/{name}"].dtype == x.dtype
    np.testing.assert_array_equal(got["label"], np.array(idx) % 3)
    block = r.read_block(2, 9)
    keep = [i for i in range(2, 9) if i not in SKIPPED]
    np.testing.assert_array_equal(block["index"], keep)
    np.testing.assert_array_equal(block["teachers/t/patch"], truth["teachers/t"]["patch"][keep])


def test_reader_reads_only_requested_groups(cache):
    root, _ = cache
    r = CacheReader(root, groups=["t"])
    assert list(r.groups) == ["teachers/t"]
    got = r.read([1, 2])
    assert set(got) == {"teachers/t/patch", "teachers/t/cls", "label", "index"}
    with pytest.raises(CacheError, match="was not opened"):
        r.read([1], groups=[LATENTS])


def test_skipped_input_is_refused_not_returned_as_fill(cache):
    root, _ = cache
    with pytest.raises(CacheError, match="cache index 5 is a skipped input"):
        CacheReader(root).read([4, 5])


def test_uncommitted_cache_refused_and_reported(tmp_path):
    root = tmp_path / "c"
    build(root, commit=False)
    with pytest.raises(CacheError, match="has no committed group"):
        CacheReader(root)
    with pytest.raises(CacheError, match="group 'latents' of .* is not committed"):
        CacheReader(root, groups=[LATENTS])
    report = verify_cache(root, quiet=True)
    assert not report.ok
    assert {str(p) for p in report.problems} == {
        "latents: is not committed (its precompute did not finish)",
        "teachers/t: is not committed (its precompute did not finish)",
    }


def test_intact_cache_verifies(cache):
    root, _ = cache
    report = verify_cache(root, quiet=True)
    assert report.ok and report.shards_checked == 2 * 3


def _shard_file(root: Path, group: str, name: str, shard: int) -> Path:
    import zarr

    arr = zarr.open_group(str(root), mode="r")[group][name]
    return root / shard_key(arr, shard)


def _damaged(report: VerifyReport) -> list[tuple[str, int]]:
    """(group, shard) of every shard verify reported a problem with, sorted."""
    return sorted({(p.group, p.shard) for p in report.problems if p.shard is not None})


def test_bit_flip_detected_by_verify_and_checked_reader(cache):
    root, truth = cache
    f = _shard_file(root, "teachers/t", "patch", 1)
    start, stop = chunk_span(f, position=1)  # sample 4, view 1
    raw = bytearray(f.read_bytes())
    raw[(start + stop) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    report = verify_cache(root, quiet=True)
    assert _damaged(report) == [("teachers/t", 1)]
    assert "fails its checksum" in str(report.problems[0])
    for verify in (True, False):  # each chunk checks its own crc32c when decoded, whatever the reader's setting
        r = CacheReader(root, verify_checksums=verify)
        r.read([0, 1])  # shard 0 is fine
        same_shard = r.read_views([4], [0])  # the other view of the damaged sample is another chunk: intact
        np.testing.assert_array_equal(same_shard["teachers/t/patch"], truth["teachers/t"]["patch"][[4], 0])
        with pytest.raises(CacheError, match="shard 1 of 'patch' fails its checksum"):
            r.read([4])


def test_truncated_chunk_detected_and_never_read_as_fill(cache):
    root, _ = cache
    f = _shard_file(root, LATENTS, "mean", 2)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert _damaged(verify_cache(root, quiet=True)) == [(LATENTS, 2)]
    with pytest.raises(CacheError, match="shard 2"):
        CacheReader(root).read([8])  # default reader: no checksum, but never returns fill/garbage silently


def test_missing_shard_refused_naming_it(cache):
    root, _ = cache
    _shard_file(root, LATENTS, "std", 1).unlink()
    report = verify_cache(root, quiet=True)
    assert [str(p) for p in report.problems] == ["latents shard 1: of 'std' is missing"]
    with pytest.raises(CacheError, match="shard 1 of 'std' is missing"):
        CacheReader(root)


def test_missing_record_refused(cache):
    root, _ = cache
    record_path(root, "teachers/t", 0).unlink()
    with pytest.raises(CacheError, match="shard 0 has no record"):
        CacheReader(root, groups=["t"])
    assert ("teachers/t", 0) in _damaged(verify_cache(root, quiet=True))


def _latents_only(root: Path) -> tuple[Path, CacheMeta, GroupMeta, dict[str, np.ndarray]]:
    """An empty cache with only the latents group created; its data not yet written."""
    meta = _meta()
    create_cache(root, meta, pa.table({"index": np.arange(N), "key": [str(i) for i in range(N)], "label": pa.array([0] * N, pa.int32())}))
    g = _groups()[0]
    create_group(root, meta, g)
    return root, meta, g, _data(meta, g, 0)


def test_commit_refuses_incomplete_group(tmp_path):
    root, meta, g, data = _latents_only(tmp_path / "c")
    write_shard(root, meta, g, 0, {k: v[:SHARD] for k, v in data.items()}, _outcomes(0, SHARD), "w")
    with pytest.raises(CacheError, match=r"shards \[1, 2\] have no record"):
        commit_group(root, meta, g)
    assert not commit_path(root, LATENTS).exists()


def test_not_a_cache_messages(tmp_path):
    with pytest.raises(CacheError, match="no cache at"):
        CacheReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="is not a repa cache"):
        CacheReader(tmp_path / "empty")


def test_record_is_json_with_checksums(cache):
    root, _ = cache
    rec = json.loads(record_path(root, LATENTS, 0).read_text())
    assert rec["count"] == SHARD and set(rec["checksums"]) == {"mean", "std"}
    assert all(len(v) == 64 for v in rec["checksums"].values())


def test_fingerprint_diff_names_fields():
    assert fingerprint_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}}) == ["b.c: 2 -> 3"]
    assert fingerprint_diff({"a": 1}, {"a": 1}) == []


def test_copy_of_cache_reads_identically(cache, tmp_path):
    root, truth = cache
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    np.testing.assert_array_equal(CacheReader(dst).read([0])["latents/mean"], truth[LATENTS]["mean"][[0]])


def test_all_skipped_shard_writes_no_object_and_reads_as_refused(tmp_path):
    root, meta, g, data = _latents_only(tmp_path / "c")
    for s in range(meta.num_shards):
        a, b = meta.shard_range(s)
        block = {k: v[a:b].copy() for k, v in data.items()}
        outcomes = _outcomes(a, b)
        if s == 2:  # the last shard: every input failed to decode
            for v in block.values():
                v[:] = np.nan
            outcomes = [["skipped", "corrupt", 0, 0]] * (b - a)
        rec = write_shard(root, meta, g, s, block, outcomes, "w")
    assert rec.checksums == {"mean": "absent", "std": "absent"}
    commit_group(root, meta, g)
    r = CacheReader(root)
    assert r.valid_indices().max() < 8
    with pytest.raises(CacheError, match="is a skipped input"):
        r.read([9])
    assert verify_cache(root, quiet=True).ok
