"""Stage one's driver at ImageNet scale: listing, planning and shard tasks for N inputs.

Everything ``repa precompute`` does in the driver process before it submits its first task grows
with the number of inputs N. This bench measures it on generated datasets of N inputs in two
layouts:

* ``imagefolder``: 1000 class folders named like ImageNet's (``n01440764/n01440764_10026.JPEG``),
  N/1000 files each;
* ``webdataset``: ``.tar`` shards of ``--samples-per-tar`` samples (1280: 1000 tars at 1.28 M),
  classes mixed across shards, each sample a ``.jpg`` member and a ``.cls`` member with its label.

Files and members hold a few bytes each: the driver never decodes pixels, it reads names, sizes,
tar headers and labels. The trees are made under ``--workdir``, once: a complete tree is reused by
later runs. A folder is only ever deleted if this bench made it (it holds the bench's marker file),
and a folder there that the bench did not make stops the run.

Each dataset is first listed once, unmeasured, so that every step finds it in the OS caches (a
cold listing of 1.28 M files can take twice as long as a warm one, depending on what ran before).
Then the steps, each in a fresh Python process (so that a peak is the peak of that step), each
running the real ``precompute`` (tiny VAE and teacher presets, ``--shard-size 256`` as the
default, a fresh cache, so every shard is still to do) with the steps around it timed, stopped
before it submits anything to dask:

* ``list``: ``list_source``;
* ``plan``: ``make_plan`` (listing fingerprint, sample order, plan table, root metadata); the
  fingerprint and ``sample_order`` are also timed on their own;
* ``tasks``: everything between the plan and the first submission: the writer lock, the cache's
  root metadata and plan file, the groups, the shard records, the inputs in cache order and
  ``shard_tasks`` (also timed on its own);
* ``driver``: the whole of it, from the call to ``precompute`` to the first submission; its
  ``held`` is the driver's memory while its tasks run (listing + plan + tasks, and whatever else
  is still referenced).

For each step: wall seconds; ``peak`` = the highest resident set size during the step (``VmHWM``
of ``/proc/self/status``, reset at the step's start by writing 5 to ``/proc/self/clear_refs``)
minus the resident size when the step began; ``held`` = resident size after the step (after a
garbage collection) minus that at its start. Python's allocators rarely give freed memory back to
the system, so ``held`` is close to ``peak``; what the driver still references is counted
directly: the ``list`` step gives the bytes of the objects its listing holds, by type, and the
``tasks`` and ``driver`` steps the bytes held by the listing, the plan and the tasks at the first
submission (``sys.getsizeof`` of every object reachable, each counted once, with the first part
that reaches it; numpy data and pyarrow buffers included), and the pickled size of the tasks
(what the driver hands to dask's scheduler). Every size is also given per input (bytes per
input). Between consecutive sizes, the growth exponent ``log(cost2/cost1) / log(N2/N1)`` of
seconds, peak and held: 1 is linear, and one above ``--superlinear`` (1.2) is reported as growing
faster than linearly. Fixed costs make exponents below 1 at small N.

Examples::

    python bench/scale_source.py                                  # 20k, 160k, 1.28M; trees in /tmp
    python bench/scale_source.py --sizes 20000,160000 --out bench/results/scale_source.json
    python bench/scale_source.py --layouts webdataset --steps list,driver
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

LAYOUTS = ("imagefolder", "webdataset")
STEPS = ("list", "plan", "tasks", "driver")
NUM_CLASSES = 1000
OWNER_FILE = ".made-by-scale-source"  # written first: this bench made the folder
COMPLETE_FILE = ".scale-source-complete.json"  # written last: the tree is whole
MIB = 2**20

# --------------------------------------------------------------------------------------------
# memory of this process


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(found.group(1)) * 1024


def rss() -> int:
    return _status_bytes("VmRSS")


def reset_peak() -> bool:
    """Reset the peak resident size to the current one (Linux >= 4.0); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    try:
        return _status_bytes("VmHWM")
    except (OSError, RuntimeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class Span:
    """Seconds, peak and held resident bytes of the code run between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.rss0 = 0
        self.peak_reset = False

    def start(self) -> None:
        gc.collect()
        self.rss0 = rss()
        self.peak_reset = reset_peak()
        self.t0 = time.perf_counter()

    def stop(self, n: int) -> dict[str, Any]:
        seconds = time.perf_counter() - self.t0
        peak = peak_rss()
        gc.collect()
        held = rss() - self.rss0
        return {
            "seconds": seconds,
            "peak_bytes": peak - self.rss0,
            "held_bytes": held,
            "peak_bytes_per_input": (peak - self.rss0) / n,
            "held_bytes_per_input": held / n,
            "rss_at_start_bytes": self.rss0,
            "peak_is_per_step": self.peak_reset,  # False: the peak is the process's since it started
        }


def python_bytes_by_type(obj: object, seen: set[int] | None = None) -> dict[str, int]:
    """Bytes of every object reachable from ``obj`` (each once; ``seen`` carries the objects
    already counted elsewhere), summed by type name: ``sys.getsizeof``, the data of numpy arrays
    (and the objects an object array holds), and the buffers of pyarrow tables and arrays.
    Classes and modules are not followed."""
    import pyarrow as pa

    seen = set() if seen is None else seen
    sizes: Counter[str] = Counter()
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, type) or type(o).__name__ == "module":
            continue
        seen.add(id(o))
        name = type(o).__name__
        if isinstance(o, np.ndarray):
            sizes[name] += sys.getsizeof(o)  # with its data when the array owns it
            if o.base is not None:
                stack.append(o.base)
            elif o.dtype == object:
                stack.extend(o.ravel().tolist())
        elif isinstance(o, (pa.Table, pa.Array, pa.ChunkedArray, pa.RecordBatch)):
            sizes["pyarrow"] += o.nbytes
        else:
            sizes[name] += sys.getsizeof(o)
            stack.extend(gc.get_referents(o))
    return dict(sizes.most_common())


# --------------------------------------------------------------------------------------------
# generated datasets


def class_names() -> list[str]:
    """1000 WordNet-like ids (``n`` + 8 digits), sorted, the same on every run."""
    rng = np.random.default_rng(1000)
    ids = rng.choice(np.arange(1_000_000, 15_000_000), NUM_CLASSES, replace=False)
    return sorted(f"n{i:08d}" for i in ids)


def samples(n: int) -> Iterator[tuple[int, str]]:
    """(label, file stem) of the N samples, class by class: N/1000 per class (the first N % 1000
    classes get one more), stems ``<class>_<number>`` with ImageNet-like numbers."""
    names = class_names()
    rng = np.random.default_rng(n)
    for label, name in enumerate(names):
        count = n // NUM_CLASSES + (label < n % NUM_CLASSES)
        numbers = rng.choice(max(50_000, 2 * count), count, replace=False) + 1
        for number in numbers:
            yield label, f"{name}_{int(number)}"


def content(i: int) -> bytes:
    """A few bytes: a JPEG start marker and the sample number (3 to 10 bytes)."""
    return b"\xff\xd8\xff" + str(i).encode()[:7]


def _claim(folder: Path) -> bool:
    """True when ``folder`` holds a complete tree of this bench; otherwise make it empty and ours.

    Raises:
        SystemExit: ``folder`` exists and this bench did not make it.
    """
    if (folder / COMPLETE_FILE).is_file():
        return True
    if folder.exists():
        if not (folder / OWNER_FILE).is_file():
            raise SystemExit(f"{folder} exists and was not made by this bench; move it or choose another --workdir")
        shutil.rmtree(folder)  # an unfinished tree of ours
    folder.mkdir(parents=True)
    (folder / OWNER_FILE).write_text("made by bench/scale_source.py; safe to delete\n")
    return False


def _finish(folder: Path, layout: str, n: int, seconds: float) -> None:
    (folder / COMPLETE_FILE).write_text(json.dumps({"layout": layout, "n": n, "generated_s": round(seconds, 1)}))


def make_imagefolder(folder: Path, n: int) -> float:
    """An ImageNet-style tree of N files; 0.0 when a complete one is already there, else seconds."""
    if _claim(folder):
        return 0.0
    t0 = time.perf_counter()
    made: set[str] = set()
    for i, (_, stem) in enumerate(samples(n)):
        name = stem.rsplit("_", 1)[0]
        if name not in made:
            (folder / name).mkdir()
            made.add(name)
        fd = os.open(folder / name / f"{stem}.JPEG", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, content(i))
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t0
    _finish(folder, "imagefolder", n, seconds)
    return seconds


def make_webdataset(folder: Path, n: int, per_tar: int) -> float:
    """N samples in tar shards of ``per_tar`` samples, classes mixed; 0.0 when already there."""
    if _claim(folder):
        return 0.0
    t0 = time.perf_counter()
    everything = list(samples(n))
    order = np.random.default_rng(n + 1).permutation(len(everything))
    for shard, first in enumerate(range(0, n, per_tar)):
        with tarfile.open(folder / f"imagenet-train-{shard:06d}.tar", mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in order[first : first + per_tar]:
                label, stem = everything[int(i)]
                for ext, data in (("jpg", content(int(i))), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{stem}.{ext}")
                    info.size = len(data)
                    info.mtime = 1_700_000_000
                    tar.addfile(info, _Reader(data))
    seconds = time.perf_counter() - t0
    _finish(folder, "webdataset", n, seconds)
    return seconds


class _Reader:
    """The least file object ``TarFile.addfile`` reads a member's data from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes:
        out, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return out


# --------------------------------------------------------------------------------------------
# one step, in a child process


class _Stop(Exception):
    """Raised by a stand-in to end ``precompute`` once the measured step is over."""


def run_step(step: str, root: Path, out: Path, n: int) -> dict[str, Any]:
    """Run ``precompute`` on ``root`` into the empty folder ``out`` up to the first submission,
    measuring ``step`` (see the module docstring)."""
    import repa_cache.pipeline.plan as plan_mod
    import repa_cache.pipeline.precompute as pre
    from repa_cache.pipeline.plan import PrecomputeConfig
    from repa_cache.pipeline.source import SourceListing

    cfg = PrecomputeConfig(data=str(root), out=str(out), vae="tiny", teachers=("tiny",), device="cpu", workers=1, quiet=True)
    assert cfg.shard_size == 256, "the bench measures the default shard size"
    result: dict[str, Any] = {}
    span = Span()
    timed: dict[str, float] = {}

    kept: dict[str, Any] = {}  # what the driver holds: the listing, the plan, the tasks

    def timing(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            value = fn(*args, **kwargs)
            timed[name] = timed.get(name, 0.0) + time.perf_counter() - t0
            if name == "fingerprint":
                result["listing_fingerprint"] = value
            kept[name] = value
            return value
        return wrapper

    def measured(fn: Callable[..., Any], last: bool) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            span.start()
            value = fn(*args, **kwargs)
            result.update(span.stop(n))
            if step == "list":
                result["python_bytes_by_type"] = python_bytes_by_type(value)
                result["python_bytes_per_input"] = sum(result["python_bytes_by_type"].values()) / n
            if last:
                raise _Stop
            return value
        return wrapper

    def started_after(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            value = fn(*args, **kwargs)
            span.start()
            return value
        return wrapper

    def submit_stand_in(cfg: Any, tasks: list[Any], known_weights: dict[str, str]) -> int:
        result.update(span.stop(n))
        result["num_tasks"] = len(tasks)
        result["inputs_in_tasks"] = sum(len(t.items) for t in tasks)
        kept["tasks"] = tasks
        seen: set[int] = set()  # an object two parts share is counted with the first
        held = {part: sum(python_bytes_by_type(kept[name], seen).values()) for part, name in
                (("listing", "list_source"), ("plan", "make_plan"), ("tasks", "tasks")) if name in kept}
        result["held_python_bytes"] = held
        result["held_python_bytes_per_input"] = {part: b / n for part, b in held.items()}
        sizes = [len(pickle.dumps(t, protocol=5)) for t in tasks]
        result["task_pickle_bytes"] = sum(sizes)
        result["task_pickle_bytes_per_input"] = sum(sizes) / n
        raise _Stop

    pre.shard_tasks = timing("shard_tasks", pre.shard_tasks)  # type: ignore[method-assign]
    pre.list_source = timing("list_source", pre.list_source)  # type: ignore[method-assign]
    pre.make_plan = timing("make_plan", pre.make_plan)  # type: ignore[method-assign]
    plan_mod.sample_order = timing("sample_order", plan_mod.sample_order)  # type: ignore[method-assign]
    SourceListing.fingerprint = timing("fingerprint", SourceListing.fingerprint)  # type: ignore[method-assign]
    if step == "list":
        pre.list_source = measured(pre.list_source, last=True)  # type: ignore[method-assign]
    elif step == "plan":
        pre.make_plan = measured(pre.make_plan, last=True)  # type: ignore[method-assign]
    elif step == "tasks":
        pre.make_plan = started_after(pre.make_plan)  # type: ignore[method-assign]
        pre._run_tasks = submit_stand_in  # type: ignore[method-assign]
    else:
        pre._run_tasks = submit_stand_in  # type: ignore[method-assign]

    gc.collect()
    result["rss_after_imports_bytes"] = rss()
    if step == "driver":
        span.start()
    try:
        pre.precompute(cfg)
    except _Stop:
        pass
    else:
        raise RuntimeError("precompute finished without reaching the measured step")
    result["seconds_of"] = timed
    return result


# --------------------------------------------------------------------------------------------
# the driver of the bench


def exponent(n1: int, c1: float, n2: int, c2: float) -> float | None:
    if c1 <= 0 or c2 <= 0:
        return None
    return math.log(c2 / c1) / math.log(n2 / n1)


def growth(rows: list[dict[str, Any]], limit: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Exponents between consecutive sizes, per layout, step and cost; and the costs above ``limit``."""
    out, faster = [], []
    keyed = {(r["layout"], r["step"], r["n"]): r for r in rows}
    for layout, step in sorted({(r["layout"], r["step"]) for r in rows}):
        sizes = sorted(n for (lay, st, n) in keyed if (lay, st) == (layout, step))
        for n1, n2 in pairwise(sizes):
            a, b = keyed[layout, step, n1], keyed[layout, step, n2]
            row: dict[str, Any] = {"layout": layout, "step": step, "n1": n1, "n2": n2}
            for cost in ("seconds", "peak_bytes", "held_bytes"):
                e = exponent(n1, a[cost], n2, b[cost])
                row[cost] = None if e is None else round(e, 3)
                if e is not None and e > limit:
                    faster.append(f"{layout} {step} {cost}: exponent {e:.2f} from N={n1} to N={n2}")
            out.append(row)
    return out, faster


def warm_up(root: Path) -> dict[str, Any]:
    """List ``root`` once, unmeasured, so that every step finds its folders, inodes and tar headers
    in the OS caches (the first listing after the trees were written, or after other work, can
    be several times slower, and would make its step's numbers depend on what ran before)."""
    from repa_cache.pipeline.source import list_source

    t0 = time.perf_counter()
    list_source(root)
    return {"seconds": time.perf_counter() - t0}


def child(args: argparse.Namespace) -> None:
    res = warm_up(Path(args.root)) if args.child == "warm" else run_step(args.child, Path(args.root), Path(args.cache), args.n)
    print(json.dumps(res))


def run_child(step: str, root: Path, n: int, workdir: Path) -> dict[str, Any]:
    """One step in a fresh process, with a new empty cache folder (removed afterwards)."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=workdir))
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", step, "--root", str(root), "--cache", str(cache), "--n", str(n)],
            capture_output=True, text=True, check=False,
        )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"step {step} on {root} failed (exit {proc.returncode})")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20000,160000,1280000", help="numbers of inputs N, comma-separated")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "repa-scale-source"),
                   help="where the generated datasets are kept between runs (and the caches made meanwhile)")
    p.add_argument("--samples-per-tar", type=int, default=1280)
    p.add_argument("--superlinear", type=float, default=1.2, help="report exponents above this")
    p.add_argument("--out", "--json", dest="out", default=None, help="also write the result here (JSON)")
    p.add_argument("--child", choices=(*STEPS, "warm"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    sizes = sorted(int(s) for s in args.sizes.split(","))
    layouts = [s for s in args.layouts.split(",") if s]
    steps = [s for s in args.steps.split(",") if s]
    if not set(layouts) <= set(LAYOUTS) or not set(steps) <= set(STEPS) or min(sizes) < NUM_CLASSES:
        p.error(f"layouts must be of {LAYOUTS}, steps of {STEPS}, sizes at least {NUM_CLASSES}")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, Any]] = []
    generated: dict[str, float] = {}
    warm: dict[str, float] = {}  # seconds of the warm-up listing of each dataset
    for n in sizes:
        for layout in layouts:
            root = workdir / f"{layout}-{n}"
            print(f"[{layout} N={n}] dataset in {root} ...", file=sys.stderr, flush=True)
            if layout == "imagefolder":
                generated[root.name] = make_imagefolder(root, n)
            else:
                generated[root.name] = make_webdataset(root, n, args.samples_per_tar)
            warm[root.name] = run_child("warm", root, n, workdir)["seconds"]
            for step in steps:
                row = {"layout": layout, "n": n, "step": step, **run_child(step, root, n, workdir)}
                rows.append(row)
                print(f"[{layout} N={n}] {step:6s} {row['seconds']:8.2f} s  peak {row['peak_bytes'] / MIB:8.1f} MiB "
                      f"({row['peak_bytes_per_input']:6.0f} B/input)  held {row['held_bytes'] / MIB:8.1f} MiB "
                      f"({row['held_bytes_per_input']:6.0f} B/input)", file=sys.stderr, flush=True)

    exponents, faster = growth(rows, args.superlinear)
    out = {
        "info": {
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "workdir": str(workdir),
            "shard_size": 256,
            "samples_per_tar": args.samples_per_tar,
            "generated_s": generated,
            "warm_up_listing_s": warm,
        },
        "results": rows,
        "exponents": exponents,
        "faster_than_linear": faster,
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
