"""Stage one against unlucky and hostile destinations: a group cut off
between its zarr.json and its attributes, two writers on one OUT, stale locks, foreign files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import record_path
from repa_cache.cache.lock import LOCK_FILE
from repa_cache.cache.reader import CacheReader
from repa_cache.cache.stats import cache_stats
from repa_cache.cache.verify import verify_cache
from repa_cache.pipeline.precompute import precompute

from ..conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _assert_same_cache(a: Path, b: Path) -> None:
    ra, rb = CacheReader(a), CacheReader(b)
    assert list(ra.groups) == list(rb.groups)
    for g in ra.groups:
        for shard in range(ra.meta.num_shards):
            ja = json.loads(record_path(ra.root, g, shard).read_text())
            jb = json.loads(record_path(rb.root, g, shard).read_text())
            assert (ja["checksums"], ja["outcomes"]) == (jb["checksums"], jb["outcomes"]), (g, shard)
    idx = ra.valid_indices()
    xa, xb = ra.read(idx), rb.read(idx)
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k])


@pytest.mark.parametrize("group", ["latents", "teachers/tiny"])
def test_kill_between_group_zarr_json_and_attributes_then_rerun_equals_uninterrupted(group, tiny_cache, demo_images, tmp_path):
    killed = tmp_path / "k"
    shutil.copytree(tiny_cache, killed)
    # The state a SIGKILL right after the group's zarr.json leaves: the groups created before it are
    # whole (no shard yet), this one has its zarr.json (and one array's) without attributes.
    shutil.rmtree(killed / "_records")
    shutil.rmtree(killed / "_commits")
    (killed / "manifest.parquet").unlink()
    shutil.rmtree(killed / group)
    if group == "latents":
        shutil.rmtree(killed / "teachers")
    grp = zarr.open_group(str(killed), mode="r+").require_group(group)
    grp.create_array("mean" if group == "latents" else "patch", shape=(22, 2, 4), dtype="float32")
    assert "repa_group" not in json.loads((killed / group / "zarr.json").read_text()).get("attributes", {})
    # verify and stats no longer crash with KeyError: 'repa_group'; the group is simply absent.
    report = verify_cache(killed, quiet=True)
    assert group not in report.groups and not report.ok
    assert group not in cache_stats(killed)["groups"]
    res = precompute(tiny_config(demo_images, killed))
    assert res.groups[group] == "written"
    _assert_same_cache(tiny_cache, killed)
    assert verify_cache(killed, quiet=True).ok
    assert set(cache_stats(killed)["groups"]) == {"latents", "teachers/tiny"}
    assert not (killed / LOCK_FILE).exists()


def test_nonempty_out_that_is_not_a_cache_is_refused_untouched(demo_images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"the user's")
    with pytest.raises(UsageError, match=f"output folder {out} is not empty and is not a repa cache"):
        precompute(tiny_config(demo_images, out))
    assert [p.name for p in out.iterdir()] == ["shard-000000.tar"]
    assert (out / "shard-000000.tar").read_bytes() == b"the user's"


def test_stale_lock_of_a_dead_precompute_is_taken_over(tiny_cache, demo_images, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(tiny_cache, copy)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (copy / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "old",
                                              "command": "repa precompute", "started_at": "x"}))
    res = precompute(tiny_config(demo_images, copy))
    assert res.groups == {"latents": "already committed", "teachers/tiny": "already committed"}
    assert not (copy / LOCK_FILE).exists()
    # A new OUT holding only a stale lock (killed right after taking it) is still a new cache.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "token": "old",
                                               "command": "repa precompute", "started_at": "x"}))
    precompute(tiny_config(demo_images, fresh, teachers=()))
    assert verify_cache(fresh, quiet=True).ok


@pytest.mark.slow
def test_two_concurrent_precomputes_give_one_clean_cache_and_one_line(demo_images, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "repa_cache.cli", "precompute", str(demo_images), str(out), "--vae", "tiny",
           "--teacher", "tiny", "--shard-size", "2", "--batch-size", "2", "--device", "cpu", "--workers", "1", "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = sorted((p.wait(300), *p.communicate()) for p in procs)
    (ok_code, ok_out, _), (bad_code, _, bad_err) = results
    assert ok_code == 0 and "latents: written" in ok_out
    assert bad_code == 2, bad_err
    lines = bad_err.strip().splitlines()
    assert len(lines) == 1, bad_err
    assert lines[0].startswith(f"error: {out} is being written by repa precompute (host {socket.gethostname()}, pid ")
    assert lines[0].endswith("wait for it to finish (or stop it) and run again")
    assert verify_cache(out, quiet=True).ok
    assert not (out / LOCK_FILE).exists()
    clean = tmp_path / "clean"
    assert subprocess.run([*cmd[:5], str(clean), *cmd[6:]], cwd=ROOT, env=env, capture_output=True).returncode == 0
    _assert_same_cache(clean, out)
