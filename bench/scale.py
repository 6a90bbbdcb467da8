"""Every cost of a cache against its size: N = 20 k, 160 k and 1.28 M samples (ImageNet-1k).

For each N a synthetic cache is written with the writer API (the real layout: shards of 256
samples, both views, so 5,000 shards per group at 1.28 M; records with per-input outcomes and input
hashes as stage one writes them; small token geometry, so the largest cache is about 2 GB:
latents 4x4x4 float32 mean and std, the ``tiny`` teacher's 2x2 tokens of 32 channels in float16).
Then, each command in a fresh process (so its peak memory is its own):

* ``write``: seconds (shards, commit), files and bytes;
* ``repa stats``, ``repa verify``, ``repa export-wds``, ``repa cache copy``: seconds, peak RSS;
* ``repa train --dry-run``; ``repa train`` (SiT-tiny/2, batch 256, 2 loader workers): seconds from
  launch to its first step, peak RSS of the trainer and of each loader worker (resident and
  private); then the same command again, which resumes from its checkpoint;
* one loader process of a job with 8 GPUs x 8 workers (rank 0, worker 0: every 8th local batch of
  32 samples), over its first K steps and over its share of an epoch (N / 64 samples): bytes read
  from storage (``rchar`` of /proc/self/io), bytes checksummed (crc32c: zarr's codecs; sha256:
  whole-shard hashes), the bytes its batches hold (their chunks as stored, from the shard
  indices), the bytes a whole-shard check would hash (every object of every shard it touches),
  and the memory it gains while it reads.

A last probe repeats the loader measurement on a cache with DINOv2-B geometry (256x768 float16
tokens, 4x32x32 latents) at a small N, where the ratios are those of a real cache. Each cost gets
its growth exponent between consecutive sizes, ``log(c2 / c1) / log(N2 / N1)`` (1 = linear), and
docs/benchmarks.md extrapolates them to ImageNet from the per-shard and per-sample figures.

Caches are kept under ``--workdir`` and reused when complete; copies and exports are removed after
they are measured. Examples::

    python bench/scale.py                                   # 20 k, 160 k, 1.28 M (about 3 h on 2 cores)
    python bench/scale.py --sizes 20000 --steps 8 --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from common import command_line, markdown_table, synthetic_block, synthetic_layout  # type: ignore[import-not-found]

from repa_cache.cache.format import LATENTS, commit_path
from repa_cache.cache.writer import commit_group, create_cache, create_group, write_shard

SHARD = 256
TEACHER = "tiny"
REPA = [sys.executable, "-m", "repa_cache.cli"]
GPUS, WORKERS, GLOBAL_BATCH = 8, 8, 256  # the ImageNet job the loader probe stands for


# ------------------------------------------------------------------------------------------------
# writing


def _write_shards(args: tuple[str, int, int, list[int]]) -> None:
    """Write the shards ``shards`` of group number ``gi`` (a worker process of the pool)."""
    root, n, gi, shards = args
    meta, _, groups = synthetic_layout(n, teacher=TEACHER, resolution=32, shard_size=SHARD)
    g = groups[gi]
    for s in shards:
        rng = np.random.default_rng([gi, s])
        start, stop = meta.shard_range(s)
        block = synthetic_block(g, stop - start, len(meta.views), rng)
        outcomes = [["ok", "", 500, 375]] * (stop - start)  # an ImageNet-like size per input
        hashes = [hashlib.sha256(f"{i}".encode()).hexdigest() for i in range(start, stop)]
        write_shard(root, meta, g, s, block, outcomes, "synthetic" + "0" * 55, hashes)


def write_cache(root: Path, n: int, jobs: int) -> dict[str, Any]:
    """The synthetic cache of ``n`` samples (reused when already committed); seconds, files, bytes."""
    meta, plan, groups = synthetic_layout(n, teacher=TEACHER, resolution=32, shard_size=SHARD)
    out: dict[str, Any] = {"shards_per_group": meta.num_shards}
    if not all(commit_path(root, g.group).exists() for g in groups):
        if root.exists():
            shutil.rmtree(root)  # an incomplete cache of this benchmark's own
        t0 = time.perf_counter()
        create_cache(root, meta, plan)
        for gi, g in enumerate(groups):
            create_group(root, meta, g)
            parts = [list(range(meta.num_shards))[j::jobs] for j in range(jobs)]
            # spawned, not forked: a forked child would inherit zarr's event loop without its thread
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(_write_shards, [(str(root), n, gi, p) for p in parts]))
        out["write_shards_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for g in groups:
            commit_group(root, meta, g)
        out["commit_s"] = time.perf_counter() - t0
    files = [p for p in root.rglob("*") if p.is_file()]
    out["files"] = len(files)
    out["bytes"] = sum(p.stat().st_size for p in files)
    out["record_bytes"] = sum(p.stat().st_size for p in (root / "_records").rglob("*.json"))
    return out


# ------------------------------------------------------------------------------------------------
# commands in their own processes


def _status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _private_kib(pid: int) -> int | None:
    try:
        rows = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    return sum(int(r.split()[1]) for r in rows if r.startswith(("Private_Clean:", "Private_Dirty:")))


class Watch:
    """Polls a process tree: peak resident set (VmHWM) and peak private memory of each process."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid, self.every = pid, every
        self.peak: dict[int, int] = {}
        self.private: dict[int, int] = {}
        self.parent: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            pids.append(p)
            try:
                kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            except OSError:
                continue
            for k in kids:
                self.parent.setdefault(int(k), p)
                todo.append(int(k))
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self._tree():
                hwm, priv = _status_kib(p, "VmHWM"), _private_kib(p)
                if hwm is not None:
                    self.peak[p] = max(self.peak.get(p, 0), hwm)
                if priv is not None:
                    self.private[p] = max(self.private.get(p, 0), priv)
            time.sleep(self.every)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        kids = [p for p in self.peak if p != self.pid]
        return {"main_peak_rss_mb": self.peak.get(self.pid, 0) / 1024,
                "main_peak_private_mb": self.private.get(self.pid, 0) / 1024,
                "children_peak_rss_mb": [self.peak[p] / 1024 for p in kids],
                "children_peak_private_mb": [self.private.get(p, 0) / 1024 for p in kids]}


def run(cmd: list[str], first_line_of: Path | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a command; seconds, peak memory of its process tree, and (``first_line_of``) seconds
    until that file has a first line."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    watch = Watch(proc.pid)
    first = None
    while proc.poll() is None:
        if first_line_of is not None and first is None and first_line_of.exists() and first_line_of.read_text().count("\n"):
            first = time.perf_counter() - t0
        time.sleep(0.02)
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    mem = watch.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    res = {"seconds": wall, **mem}
    if first_line_of is not None:
        res["first_step_s"] = first
    return res


def commands(cache: Path, work: Path, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["stats"] = run([*REPA, "stats", str(cache)])
    out["verify"] = run([*REPA, "verify", str(cache), "-q"])
    wds = work / "export"
    shutil.rmtree(wds, ignore_errors=True)
    out["export_wds"] = run([*REPA, "export-wds", str(cache), str(wds), "-q"])
    out["export_wds"]["bytes"] = sum(p.stat().st_size for p in wds.iterdir())
    shutil.rmtree(wds)
    copy = work / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    out["cache_copy"] = run([*REPA, "cache", "copy", str(cache), str(copy), "-q"])
    shutil.rmtree(copy)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    train = [*REPA, "train", "--cache", str(cache), "--out", str(run_dir), "--model", "SiT-tiny/2", "--batch-size", str(GLOBAL_BATCH),
             "--log-every", "1", "--ckpt-every", "1000", "--workers", "2", "--device", "cpu", "-q"]
    out["train_dry_run"] = run([*train, "--max-steps", str(steps), "--dry-run"])
    out["train"] = run([*train, "--max-steps", str(steps)], first_line_of=run_dir / "metrics.jsonl")
    (run_dir / "metrics.jsonl").rename(run_dir / "metrics-first.jsonl")
    out["train_resume"] = run([*train, "--max-steps", str(steps + 2)], first_line_of=run_dir / "metrics.jsonl")
    shutil.rmtree(run_dir)
    return out


# ------------------------------------------------------------------------------------------------
# one loader process


def _io() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def probe(cache: str, steps: int, epoch: bool) -> dict[str, Any]:
    """One loader process of the 8 x 8 job: rank 0's every 8th local batch. Counts what it reads
    and checksums, and the bytes its batches hold (run in its own process: ``--probe``)."""
    import google_crc32c
    import zarr

    from repa_cache.cache import reader as reader_module
    from repa_cache.cache.chunks import chunk_layout
    from repa_cache.cache.layout import shard_key
    from repa_cache.train.data import CacheBatches, DataConfig

    counts = {"crc": 0, "sha": 0}
    crc32c, sha256 = google_crc32c.value, hashlib.sha256

    def value(data: Any) -> int:
        counts["crc"] += memoryview(data).nbytes
        return crc32c(data)

    class Sha:
        def __init__(self, data: bytes = b"") -> None:
            self._h = sha256()
            self.update(data)

        def update(self, data: bytes) -> None:
            counts["sha"] += len(data)
            self._h.update(data)

        def hexdigest(self) -> str:
            return self._h.hexdigest()

    google_crc32c.value = value
    reader_module.hashlib.sha256 = Sha  # type: ignore[misc]
    teacher = next(p.name for p in (Path(cache) / "teachers").iterdir() if p.is_dir())
    ds = CacheBatches(DataConfig(cache, (teacher,), GLOBAL_BATCH, num_workers=0, verify_checksums=True), rank=0, world_size=GPUS)
    n_steps = -(-ds.batches_per_epoch // WORKERS) if epoch else steps  # worker 0 of 8 takes steps 0, 8, 16, ...
    rss0, t0, io0 = _status_kib(os.getpid(), "VmRSS") or 0, time.perf_counter(), _io()
    touched: list[tuple[int, int]] = []
    for k in range(n_steps):
        b = ds[k * WORKERS]  # global step k * 8: its rank-0 slice
        touched += list(zip(b["index"].tolist(), b["view"].tolist()))
    read, seconds = _io() - io0, time.perf_counter() - t0
    rss1 = _status_kib(os.getpid(), "VmRSS") or 0
    # what the batches hold, as stored (from the shard indices), and what a whole-shard check hashes
    shard_size = ds._reader.meta.shard_size if ds._reader is not None else SHARD
    needed = 0
    fields = [(LATENTS, "mean"), (LATENTS, "std"), (f"teachers/{teacher}", "patch")]
    arrays = {(g, n): zarr.open_group(f"{cache}/{g}", mode="r")[n] for g, n in fields}
    entries: dict[tuple[str, str, int], np.ndarray] = {}
    for i, v in touched:
        shard, row = divmod(i, shard_size)
        for g, n in fields:
            arr = arrays[(g, n)]
            layout = chunk_layout(arr)
            assert layout is not None
            key = (g, n, shard)
            if key not in entries:
                raw = (Path(cache) / g / shard_key(arr, shard)).read_bytes()
                entries[key] = np.frombuffer(raw[-layout.index_bytes:-4], "<u8").reshape(-1, 2)
            views = layout.chunks_per_shard[1]
            needed += int(entries[key][row * views + (v if views > 1 else 0), 1])
    shards = {i // shard_size for i, _ in touched}
    groups = {g: zarr.open_group(f"{cache}/{g}", mode="r") for g, _ in fields}
    records = sum((Path(cache) / "_records" / g / f"{s:06d}.json").stat().st_size for g in groups for s in shards)
    # a whole-shard check (format v1) hashes every array of each group it reads, for every shard it touches
    whole = sum((Path(cache) / g / shard_key(arr, s)).stat().st_size
                for g, grp in groups.items() for _, arr in grp.arrays() for s in shards)
    return {"steps": n_steps, "samples": len(touched), "seconds": seconds, "bytes_read": read, "crc_bytes": counts["crc"],
            "sha_bytes": counts["sha"], "bytes_needed": needed, "index_bytes": sum(e.nbytes + 4 for e in entries.values()),
            "record_bytes": records, "shards_touched": len({k[2] for k in entries}), "whole_shard_bytes": whole,
            "rss_growth_mb": (rss1 - rss0) / 1024}


def run_probe(cache: Path, steps: int, epoch: bool) -> dict[str, Any]:
    res = subprocess.run([sys.executable, __file__, "--probe", str(cache), "--steps", str(steps)] + (["--epoch"] if epoch else []),
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"probe failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# report


def exponent(n1: int, c1: float | None, n2: int, c2: float | None) -> float | None:
    if not c1 or not c2 or c1 <= 0 or c2 <= 0:
        return None
    return math.log(c2 / c1) / math.log(n2 / n1)


COSTS: list[tuple[str, str]] = [
    ("write shards s", "write.write_shards_s"), ("commit s", "write.commit_s"), ("files", "write.files"), ("bytes", "write.bytes"),
    ("stats s", "commands.stats.seconds"), ("stats RSS MB", "commands.stats.main_peak_rss_mb"),
    ("verify s", "commands.verify.seconds"), ("verify RSS MB", "commands.verify.main_peak_rss_mb"),
    ("export-wds s", "commands.export_wds.seconds"), ("export-wds RSS MB", "commands.export_wds.main_peak_rss_mb"),
    ("cache copy s", "commands.cache_copy.seconds"), ("cache copy RSS MB", "commands.cache_copy.main_peak_rss_mb"),
    ("train --dry-run s", "commands.train_dry_run.seconds"),
    ("train: launch to first step s", "commands.train.first_step_s"), ("trainer RSS MB", "commands.train.main_peak_rss_mb"),
    ("trainer private MB", "commands.train.main_peak_private_mb"),
    ("loader worker RSS MB (max)", "commands.train.children_peak_rss_mb"),
    ("loader worker private MB (max)", "commands.train.children_peak_private_mb"),
    ("resume: launch to first step s", "commands.train_resume.first_step_s"),
    ("loader, first K steps: read MB", "probe_steps.bytes_read"), ("  checksummed MB", "probe_steps.crc_bytes"),
    ("  batches hold MB", "probe_steps.bytes_needed"), ("  whole-shard check would hash MB", "probe_steps.whole_shard_bytes"),
    ("loader, epoch share: read MB", "probe_epoch.bytes_read"), ("  checksummed MB", "probe_epoch.crc_bytes"),
    ("  batches hold MB", "probe_epoch.bytes_needed"), ("  whole-shard check would hash MB", "probe_epoch.whole_shard_bytes"),
    ("  memory gained MB", "probe_epoch.rss_growth_mb"),
]


def _get(d: dict[str, Any], path: str) -> float | None:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    if isinstance(d, list):
        return max(d) if d else None
    if isinstance(d, (int, float)):
        return float(d) / (1 << 20) if path.endswith(("bytes_read", "crc_bytes", "bytes_needed", "whole_shard_bytes")) else float(d)
    return None


def report(rows: dict[int, dict[str, Any]]) -> str:
    """The cost table: one row per cost, one column per N, then the growth exponents."""
    sizes = sorted(rows)
    columns = ["cost", *[f"N={n:,}" for n in sizes], *[f"exponent {a:,}→{b:,}" for a, b in itertools.pairwise(sizes)]]
    table = []
    for label, path in COSTS:
        vals = [_get(rows[n], path) for n in sizes]
        exps = [exponent(a, va, b, vb) for (a, va), (b, vb) in itertools.pairwise(zip(sizes, vals))]
        table.append(dict(zip(columns, [label, *[None if v is None else f"{v:,.3g}" for v in vals],
                                        *[None if e is None else f"{e:.2f}" for e in exps]])))
    return markdown_table(table, columns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,160000,1280000")
    ap.add_argument("--workdir", default="/tmp/repa-scale")
    ap.add_argument("--steps", type=int, default=16, help="K: steps of the trainer run and of the loader probe")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes writing shards")
    ap.add_argument("--real-geometry", type=int, default=1024, help="samples of the DINOv2-B geometry cache (0: skip)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--epoch", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.steps, args.epoch)))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, Any]] = {}
    results: dict[str, Any] = {"command": command_line(), "cpus": os.cpu_count(), "sizes": rows}
    for n in [int(s) for s in args.sizes.split(",")]:
        cache = work / f"cache-{n}"
        print(f"N = {n:,}: writing", file=sys.stderr, flush=True)
        row: dict[str, Any] = {"write": write_cache(cache, n, args.jobs)}
        print(f"N = {n:,}: commands", file=sys.stderr, flush=True)
        row["commands"] = commands(cache, work, args.steps)
        row["probe_steps"] = run_probe(cache, args.steps, epoch=False)
        row["probe_epoch"] = run_probe(cache, args.steps, epoch=True)
        rows[n] = row
        print(json.dumps({n: row}, default=str)[:2000], file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    if args.real_geometry:
        from common import write_synthetic_cache  # type: ignore[import-not-found]

        real = work / f"dinov2-b-{args.real_geometry}"
        if not all(commit_path(real, g).exists() for g in (LATENTS, "teachers/dinov2-vit-b")):
            shutil.rmtree(real, ignore_errors=True)
            write_synthetic_cache(real, args.real_geometry, teacher="dinov2-vit-b")
        results["real_geometry"] = {"samples": args.real_geometry, "probe_steps": run_probe(real, args.steps, epoch=False)}
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(report(rows))
    if "real_geometry" in results:
        print(json.dumps(results["real_geometry"], indent=1))


if __name__ == "__main__":
    main()

