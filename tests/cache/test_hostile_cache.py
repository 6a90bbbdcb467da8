"""Hostile and unlucky caches: sizes read from metadata are bounded and
checked against each other, the manifest is required, half-created groups are absent, export and
copy never touch what they did not write, and --plot takes only types matplotlib writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from repa_cache.cache.errors import CacheError, UsageError
from repa_cache.cache.format import LATENTS, MAX_SAMPLES
from repa_cache.cache.lock import LOCK_FILE
from repa_cache.cache.reader import CacheReader, list_groups
from repa_cache.cache.stats import cache_stats
from repa_cache.cache.verify import verify_cache
from repa_cache.cache.wds import EXPORT_MARKER, INDEX_FILE, export_wds
from repa_cache.cache.wds_reader import WdsReader

from ..cache.test_cache_format import SKIPPED, N, _groups, _meta, build

VALID = [i for i in range(N) if i not in SKIPPED]


@pytest.fixture()
def cache(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "c"
    return root, build(root)


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _one_line(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert err.strip() == f"error: {message}", err


# -- 4. bounded sizes, checked against each other ------------------------------------------------
def test_num_samples_edited_to_1e15_is_refused_before_allocating(cache, run_cli):
    root, _ = cache
    _edit_json(root / "zarr.json", lambda d: d["attributes"]["repa_cache"].update(num_samples=10**15))
    want = (f"{root}: root metadata out of bounds: num_samples 1000000000000000 is not an integer in "
            f"[1, {MAX_SAMPLES}] (damaged cache)")
    for cmd in ("verify", "stats"):
        code, _, err = run_cli([cmd, str(root)])
        _one_line(code, err, want)
    with pytest.raises(CacheError, match="num_samples 1000000000000000 is not an integer"):
        CacheReader(root)


def test_num_samples_within_bounds_must_equal_the_plan_rows(cache, run_cli):
    root, _ = cache
    _edit_json(root / "zarr.json", lambda d: d["attributes"]["repa_cache"].update(num_samples=N * 1000))
    want = f"{root / 'plan.parquet'} has {N} rows but the cache metadata says {N * 1000} samples (damaged cache)"
    for cmd in ("verify", "stats"):
        code, _, err = run_cli([cmd, str(root)])
        _one_line(code, err, want)
    with pytest.raises(CacheError, match="has 10 rows but the cache metadata says 10000 samples"):
        CacheReader(root)


@pytest.mark.parametrize("field, value, problem", [
    ("shard_size", 0, "shard_size 0 is not an integer in [1, 1048576]"),
    ("shard_size", 10**9, "shard_size 1000000000 is not an integer in [1, 1048576]"),
    ("views", ["orig", "orig"], "views ['orig', 'orig'] are not distinct names of ['orig', 'hflip']"),
])
def test_root_metadata_out_of_bounds(cache, run_cli, field, value, problem):
    root, _ = cache
    _edit_json(root / "zarr.json", lambda d: d["attributes"]["repa_cache"].update({field: value}))
    code, _, err = run_cli(["verify", str(root)])
    _one_line(code, err, f"{root}: root metadata out of bounds: {problem} (damaged cache)")


def test_array_shape_edited_to_1e15_is_damage_not_intact(cache, run_cli):
    root, _ = cache
    _edit_json(root / "latents" / "mean" / "zarr.json", lambda d: d.update(shape=[10**15, 2, 4, 4, 4]))
    report = verify_cache(root, quiet=True)
    assert [str(p) for p in report.problems] == [
        f"latents: group 'latents' of {root}: array 'mean' has shape (1000000000000000, 2, 4, 4, 4), "
        f"the metadata says ({N}, 2, 4, 4, 4) (damaged cache)"
    ]
    assert report.shards_checked == 3  # the teacher's shards only: nothing sized by the bad shape ran
    code, out, _ = run_cli(["verify", str(root), "-q"])
    assert code == 1 and out.splitlines()[-1] == f"1 problem(s) in {root}"
    code, _, err = run_cli(["stats", str(root)])
    _one_line(code, err, f"group 'latents' of {root}: array 'mean' has shape (1000000000000000, 2, 4, 4, 4), "
                         f"the metadata says ({N}, 2, 4, 4, 4) (damaged cache)")
    with pytest.raises(CacheError, match=r"array 'mean' has shape \(1000000000000000,"):
        CacheReader(root)


def test_sample_shape_product_is_bounded(cache, run_cli):
    root, _ = cache
    _edit_json(root / "teachers" / "t" / "zarr.json",
               lambda d: d["attributes"]["repa_group"]["arrays"][0].update(sample_shape=[1 << 20, 1 << 20]))
    code, out, _ = run_cli(["verify", str(root), "-q"])
    assert code == 1
    assert (f"DAMAGED teachers/t: group 'teachers/t' of {root}: metadata out of bounds: array 'patch' has "
            f"1099511627776 values per sample (at most 67108864) (damaged cache)") in out.splitlines()
    code, _, err = run_cli(["stats", str(root)])
    assert code == 2 and "array 'patch' has 1099511627776 values per sample" in err and len(err.strip().splitlines()) == 1


def test_a_record_for_another_range_is_reported(cache):
    root, _ = cache
    _edit_json(root / "_records" / "latents" / "000001.json", lambda d: d.update(start=0, stop=4))
    report = verify_cache(root, quiet=True)
    assert [str(p) for p in report.problems] == [
        "latents shard 1: has a record for [0, 4) with 4 outcomes, expected [4, 8)"]


def test_deleted_manifest_fails_verify_stats_and_readers_in_one_line(cache, run_cli):
    root, _ = cache
    (root / "manifest.parquet").unlink()
    want = f"{root / 'manifest.parquet'} is missing (every committed cache has one; damaged cache)"
    for cmd in ("verify", "stats"):
        code, _, err = run_cli([cmd, str(root)])
        _one_line(code, err, want)
    with pytest.raises(CacheError, match="manifest.parquet is missing"):
        CacheReader(root)


def test_manifest_with_other_row_count_is_refused(cache, tmp_path, run_cli):
    root, _ = cache
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(root / "manifest.parquet").slice(0, 3), root / "manifest.parquet")
    code, _, err = run_cli(["verify", str(root)])
    _one_line(code, err, f"{root / 'manifest.parquet'} has 3 rows but the cache metadata says {N} samples (damaged cache)")


# -- 2. a group cut off between its zarr.json and its attributes is absent ------------------------
def _half_create(root: Path, group: str) -> None:
    """What a SIGKILL between a group's zarr.json and its attributes leaves: a group without them
    (and here also one array's metadata, written before the kill)."""
    store = zarr.open_group(str(root), mode="r+")
    grp = store.require_group(group)
    grp.create_array("patch", shape=(N, 2, 4, 8), dtype="float16")


def test_half_created_group_is_absent_for_verify_stats_and_readers(tmp_path, run_cli):
    root = tmp_path / "c"
    build(root)
    _half_create(root, "teachers/late")
    assert list_groups(root) == [LATENTS, "teachers/t"]
    assert verify_cache(root, quiet=True).ok
    s = cache_stats(root)
    assert list(s["groups"]) == [LATENTS, "teachers/t"]
    code, out, _ = run_cli(["verify", str(root), "-q"])
    assert code == 0 and out.startswith("ok: 6 shards in 2 groups verified (latents, teachers/t)")
    with pytest.raises(CacheError, match=r"has no group 'teachers/late' \(groups present: latents, teachers/t\)"):
        CacheReader(root, groups=["late"])


def test_create_group_again_completes_a_half_created_group(tmp_path):
    from repa_cache.cache.writer import commit_group, create_group, write_shard

    from ..cache.test_cache_format import _data, _outcomes

    a, b = tmp_path / "a", tmp_path / "b"
    build(a)
    build(b, commit=False)
    meta, tea = _meta(), _groups()[1]
    shutil.rmtree(b / "teachers" / "t")
    shutil.rmtree(b / "_records" / "teachers")
    _half_create(b, "teachers/t")
    (b / "teachers" / "t" / "patch" / "zarr.json").write_text("{half")  # even a torn array's metadata
    create_group(b, meta, tea)
    data = _data(meta, tea, seed=1)
    for s in range(meta.num_shards):
        lo, hi = meta.shard_range(s)
        write_shard(b, meta, tea, s, {k: v[lo:hi] for k, v in data.items()}, _outcomes(lo, hi), "w" * 64)
    for g in _groups():
        commit_group(b, meta, g)
    assert verify_cache(b, quiet=True).ok
    for s in range(meta.num_shards):
        ra = json.loads((a / "_records" / "teachers" / "t" / f"{s:06d}.json").read_text())
        rb = json.loads((b / "_records" / "teachers" / "t" / f"{s:06d}.json").read_text())
        assert ra["checksums"] == rb["checksums"]
    np.testing.assert_array_equal(CacheReader(a).read(VALID)["teachers/t/patch"], CacheReader(b).read(VALID)["teachers/t/patch"])


# -- 1. export-wds and cache copy never touch what they did not write ------------------------------
def test_export_refuses_a_folder_of_foreign_tars_and_leaves_them_byte_for_byte(cache, tmp_path, run_cli):
    root, _ = cache
    out = tmp_path / "mine"
    out.mkdir()
    theirs = {f"shard-{i:06d}.tar": bytes([i]) * (1000 + i) for i in range(3)}
    for name, raw in theirs.items():
        (out / name).write_bytes(raw)
    code, _, err = run_cli(["export-wds", str(root), str(out)])
    _one_line(code, err, f"output folder {out} is not empty and is not a webdataset export of a cache "
                         "(export-wds writes only into an empty folder or one of its own exports; nothing was changed)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == theirs
    # Also with an index.json that is not ours.
    (out / INDEX_FILE).write_text('{"format": "someone-else"}')
    with pytest.raises(UsageError, match="is not empty and is not a webdataset export"):
        export_wds(root, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != INDEX_FILE} == theirs


def test_export_of_ours_with_a_foreign_file_is_refused_untouched(cache, tmp_path):
    root, _ = cache
    out = tmp_path / "w"
    export_wds(root, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"holds 'notes.txt', which export-wds did not write; move it away"):
        export_wds(root, out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == {**before, "notes.txt": b"mine"}


def test_an_interrupted_export_of_ours_is_replaced(cache, tmp_path):
    root, truth = cache
    out = tmp_path / "w"
    first = export_wds(root, out, shard_bytes=3000)
    assert sorted(p.name for p in out.iterdir())[:2] == [INDEX_FILE, "manifest.parquet"]
    assert not (out / EXPORT_MARKER).exists() and not (out / LOCK_FILE).exists()
    # What a kill during a re-export leaves: the marker, no index, some shards, a stale lock of a dead writer.
    (out / INDEX_FILE).unlink()
    (out / EXPORT_MARKER).write_text(json.dumps({"format": "repa-cache-wds-export-in-progress"}))
    (out / "shard-000042.tar").write_bytes(b"half")
    (out / LOCK_FILE).write_text(json.dumps({"host": "nowhere-else", "pid": 1, "token": "x"}))
    with pytest.raises(CacheError, match=r"is being written by a writer \(host nowhere-else, pid 1"):
        export_wds(root, out)  # another host's lock is never taken over
    (out / LOCK_FILE).unlink()
    second = export_wds(root, out, shard_bytes=3000)
    assert [s["sha256"] for s in second["shards"]] == [s["sha256"] for s in first["shards"]]
    assert sorted(p.name for p in out.iterdir()) == sorted([INDEX_FILE, "manifest.parquet", *(s["file"] for s in first["shards"]),
                                                             *(s["crc_file"] for s in first["shards"])])
    np.testing.assert_array_equal(WdsReader(out).read(VALID)["teachers/t/cls"], truth["teachers/t"]["cls"][VALID])


def test_cache_copy_refuses_a_foreign_destination_untouched(cache, tmp_path, run_cli):
    root, _ = cache
    dst = tmp_path / "d"
    dst.mkdir()
    (dst / "shard-000000.tar").write_bytes(b"user data")
    code, _, err = run_cli(["cache", "copy", str(root), str(dst), "-q"])
    _one_line(code, err, f"destination {dst} is not empty and is not a repa cache")
    assert [p.name for p in dst.iterdir()] == ["shard-000000.tar"]
    assert (dst / "shard-000000.tar").read_bytes() == b"user data"


# -- 5. stats --plot -------------------------------------------------------------------------------
def test_stats_plot_unsupported_extension_is_one_line(cache, tmp_path, run_cli):
    root, _ = cache
    code, _, err = run_cli(["stats", str(root), "--plot", str(tmp_path / "x.xyz")])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: --plot {tmp_path / 'x.xyz'}: unsupported file type '.xyz'; use one of ")
    assert ".png" in err and ".pdf" in err
    code, _, err = run_cli(["stats", str(root), "--plot", str(tmp_path / "nope" / "x.png")])
    _one_line(code, err, f"--plot {tmp_path / 'nope' / 'x.png'}: folder {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "x.xyz").exists()
    code, _, err = run_cli(["stats", str(root), "--plot", str(tmp_path / "x.svg")])
    assert code == 0, err
    assert (tmp_path / "x.svg").read_text().lstrip().startswith("<?xml")
