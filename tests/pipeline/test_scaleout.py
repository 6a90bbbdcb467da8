"""Faults and concurrency of stage one on a real multi-process dask cluster (loopback only), each
bounded in time:

* a dask worker SIGKILLed while shards are being encoded: the run finishes (the scheduler reruns
  the lost task elsewhere), the cache verifies and equals an uninterrupted in-process run bit for bit;
* four reader processes read a cache while a fifth process adds a teacher to it: no reader error,
  no partial data, and the new group ends up committed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
from distributed.diagnostics.plugin import WorkerPlugin

from ..conftest import HUNG, tiny_config

READ_GROUPS = ["latents", "tiny"]
READ_KEYS = ["latents/mean", "latents/std", "teachers/tiny/patch", "teachers/tiny/cls"]


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class TorchThreads(WorkerPlugin):
    """Worker plugin: torch's intra-op thread count, set on every worker that joins (restarts too)."""

    name = "repa-test-torch-threads"

    def __init__(self, n: int) -> None:
        self.n = n

    def setup(self, worker) -> None:
        import torch

        torch.set_num_threads(self.n)


def _same_cache(a_path: Path, b_path: Path, groups: tuple[str, ...]) -> None:
    """Equal data (bit for bit), equal validity and equal stored bytes (checksums), shard by shard."""
    from repa_cache.cache.format import record_path
    from repa_cache.cache.reader import CacheReader

    a, b = CacheReader(a_path, groups=list(groups)), CacheReader(b_path, groups=list(groups))
    np.testing.assert_array_equal(a.valid, b.valid)
    assert a.keys == b.keys
    idx = a.valid_indices()
    ra, rb = a.read(idx), b.read(idx)
    assert list(ra) == list(rb)
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k])
    for g in groups:
        assert a.group(g).commit["records_sha256"] == b.group(g).commit["records_sha256"]
        for shard in range(a.meta.num_shards):
            ja = json.loads(record_path(a.root, g, shard).read_text())
            jb = json.loads(record_path(b.root, g, shard).read_text())
            assert (ja["checksums"], ja["outcomes"]) == (jb["checksums"], jb["outcomes"])


@pytest.mark.slow
def test_worker_sigkilled_mid_precompute_run_completes_and_equals_in_process_run(demo_images, tmp_path):
    from distributed import Client, LocalCluster

    from repa_cache.cache.verify import verify_cache
    from repa_cache.pipeline.precompute import precompute

    small = dict(shard_size=2, batch_size=2)  # 22 inputs -> 11 shard tasks
    ref = tmp_path / "ref"
    precompute(tiny_config(demo_images, ref, **small))

    out = tmp_path / "dask"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        # CPU kernels' results depend on torch's thread count: give every worker process (also the one
        # its nanny starts after the kill) the count precompute gave its single in-process worker.
        client.register_plugin(TorchThreads(max(1, os.cpu_count() or 1)))
        pids = client.run(os.getpid)
        assert len(pids) == 2
        result: dict = {}

        def run() -> None:
            try:
                result["res"] = precompute(tiny_config(demo_images, out, scheduler=cluster.scheduler_address, **small))
            except BaseException:  # noqa: BLE001 - reported by the assertion below
                result["error"] = traceback.format_exc()

        th = threading.Thread(target=run, daemon=True)
        th.start()
        records = out / "_records"
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and time.monotonic() < deadline and th.is_alive():
            if records.is_dir() and any(records.rglob("*.json")):  # encoding is under way
                busy = [w for w, keys in client.processing().items() if keys]
                if busy:
                    victim = busy[0]
                    break
            time.sleep(0.005)
        assert victim is not None, f"no worker was busy (run finished early?) {result}"
        done_at_kill = len(list(records.rglob("*.json")))
        os.kill(pids[victim], signal.SIGKILL)
        print(f"killed {victim} with {done_at_kill} of 22 shard records written")
        th.join(timeout=HUNG)
        assert not th.is_alive(), "precompute did not finish after a worker was killed"
        assert "error" not in result, result.get("error")
        assert done_at_kill < 2 * 11, "the kill landed after the last shard; the test proves nothing"
        res = result["res"]
        assert res.shards_written == 11
        assert res.groups == {"latents": "written", "teachers/tiny": "written"}
        client.wait_for_workers(2, timeout=HUNG)  # the nanny replaced the killed worker process
        new_pids = client.run(os.getpid)
        assert pids[victim] not in new_pids.values() and len(new_pids) == 2
        assert set(client.run(_torch_threads).values()) == {max(1, os.cpu_count() or 1)}

    report = verify_cache(out, quiet=True)
    assert report.ok, [str(p) for p in report.problems]
    assert report.shards_checked == 2 * 11
    _same_cache(ref, out, ("latents", "teachers/tiny"))


# -- concurrent readers and a writer -----------------------------------------------------------------
def _reader_proc(path: str, expected: str, seed: int, writer_done, out_q, min_after: int) -> None:
    """Loop: open a reader, read random valid indices, compare with the expected values; probe the
    group being added (refused until committed, then complete). Reports counts or the error."""
    try:
        from repa_cache.cache.errors import CacheError
        from repa_cache.cache.reader import CacheReader

        exp = dict(np.load(expected))
        valid = exp.pop("valid_indices")
        rng = np.random.default_rng(seed)
        n = n_uncommitted = n_absent = after = 0
        first_new = None
        while True:
            done = writer_done.is_set()
            r = CacheReader(path, groups=READ_GROUPS)
            idx = rng.choice(valid, size=6)
            got = r.read(idx)
            for k in READ_KEYS:
                if not np.array_equal(got[k], exp[k][idx]):
                    raise AssertionError(f"reader {seed}: {k} at {idx.tolist()} differs from the expected values")
            np.testing.assert_array_equal(got["label"], exp["label"][idx])
            n += 1
            if n == 1:
                out_q.put(("ready", seed))
            try:
                new = CacheReader(path, groups=["tiny-reg"]).read(idx)
                arr = new["teachers/tiny-reg/patch"]
                if arr.shape != (len(idx), 2, 256, 48) or not np.isfinite(arr).all():
                    raise AssertionError(f"reader {seed}: partial data in the new group: {arr.shape}")
                if first_new is None:
                    first_new = (idx, arr, new["teachers/tiny-reg/cls"])
            except CacheError as e:
                msg = str(e)
                if "is not committed" in msg:
                    n_uncommitted += 1
                elif "has no group 'teachers/tiny-reg'" in msg:
                    n_absent += 1
                else:
                    raise
                if done:
                    raise AssertionError(f"reader {seed}: new group refused after the writer finished: {msg}") from None
            if done:
                after += 1
                if after >= min_after:
                    break
            time.sleep(0.01)
        out_q.put(("ok", seed, {"reads": n, "uncommitted": n_uncommitted, "absent": n_absent, "first_new": first_new}))
    except BaseException:  # noqa: BLE001 - the parent asserts on it
        out_q.put(("error", seed, traceback.format_exc()))


def _writer_proc(data: str, path: str, out_q) -> None:
    try:
        from repa_cache.pipeline.precompute import precompute

        res = precompute(tiny_config(Path(data), Path(path), teachers=("tiny", "tiny-reg")))
        out_q.put(("writer", res.groups, res.shards_written))
    except BaseException:  # noqa: BLE001
        out_q.put(("writer-error", traceback.format_exc()))


@pytest.mark.slow
def test_four_readers_and_a_writer_adding_a_teacher(tiny_cache, demo_images, tmp_path):
    import multiprocessing as mp

    from repa_cache.cache.reader import CacheReader
    from repa_cache.cache.verify import verify_cache

    path = tmp_path / "c"
    shutil.copytree(tiny_cache, path)
    r = CacheReader(path, groups=READ_GROUPS)
    valid = r.valid_indices()
    full = r.read(valid)
    expected = {"valid_indices": valid, "label": r.labels}
    for k in READ_KEYS:
        arr = np.zeros((r.num_samples, *full[k].shape[1:]), full[k].dtype)
        arr[valid] = full[k]
        expected[k] = arr
    np.savez(tmp_path / "expected.npz", **expected)

    ctx = mp.get_context("spawn")  # no fork of a process that holds threads
    q = ctx.Queue()
    writer_done = ctx.Event()
    readers = [ctx.Process(target=_reader_proc, args=(str(path), str(tmp_path / "expected.npz"), s, writer_done, q, 3))
               for s in range(4)]
    writer = ctx.Process(target=_writer_proc, args=(str(demo_images), str(path), q))
    procs = readers + [writer]
    results: dict = {}
    try:
        for p in readers:
            p.start()
        ready = set()
        deadline = time.monotonic() + 90
        while len(ready) < 4:
            msg = q.get(timeout=max(1, deadline - time.monotonic()))
            assert msg[0] == "ready", msg
            ready.add(msg[1])
        writer.start()  # every reader is reading by now
        deadline = time.monotonic() + 180
        while len(results) < 5:
            try:
                msg = q.get(timeout=max(1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"timed out; got {list(results)}")
            if msg[0] in ("writer", "writer-error"):
                results["writer"] = msg
                writer_done.set()
            elif msg[0] != "ready":
                results[msg[1]] = msg
        for p in procs:
            p.join(timeout=HUNG)
    finally:
        writer_done.set()
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    assert results["writer"][0] == "writer", results["writer"][1]
    assert results["writer"][1] == {"latents": "already committed", "teachers/tiny": "already committed",
                                    "teachers/tiny-reg": "written"}
    assert results["writer"][2] == 3
    for s in range(4):
        assert results[s][0] == "ok", results[s][2]
    stats = [results[s][2] for s in range(4)]
    assert all(st["reads"] >= 4 for st in stats)
    # Reads went on while the new group was being written: it existed and was refused as uncommitted.
    assert sum(st["uncommitted"] for st in stats) > 0
    assert all(p.exitcode == 0 for p in procs)

    report = verify_cache(path, quiet=True)
    assert report.ok and report.groups == ["latents", "teachers/tiny", "teachers/tiny-reg"]
    final = CacheReader(path)
    assert set(final.groups) == {"latents", "teachers/tiny", "teachers/tiny-reg"}
    assert final.group("tiny-reg").commit["counts"]["skipped"] == 1
    for st in stats:  # what readers saw of the new group is its final content, never a partial state
        idx, patch, cls = st["first_new"]
        got = final.read(idx, groups=["tiny-reg"])
        np.testing.assert_array_equal(got["teachers/tiny-reg/patch"], patch)
        np.testing.assert_array_equal(got["teachers/tiny-reg/cls"], cls)
    # The groups that were read are untouched.
    _same_cache(tiny_cache, path, ("latents", "teachers/tiny"))
