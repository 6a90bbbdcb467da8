"""A golden record of training and sampling: run it before and after a change that must not alter
behaviour, and compare the two JSON files (``--compare OLD.json``).

For each method (repa, irepa, reg, urepa, gmem, haste) it trains a tiny student from one tiny
cache for a few steps with a resume in the middle, and records every logged loss (exact floats)
and the SHA-256 of every weight tensor (model, EMA, optimiser state) of the last checkpoint; then
it samples a few images with the ODE and SDE samplers and records the SHA-256 of the images and
the npz. Offline, on the CPU, in about two minutes::

    python bench/golden.py --out bench/results/golden-after.json --compare bench/results/golden-before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from repa_cache.eval.config import SampleConfig
from repa_cache.eval.sample import sample
from repa_cache.pipeline.demo import make_demo_images
from repa_cache.pipeline.plan import PrecomputeConfig
from repa_cache.pipeline.precompute import precompute
from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint
from repa_cache.train.config import TrainConfig
from repa_cache.train.loop import train

#: method -> (model, teachers, options) of its golden run
RUNS = {
    "repa": ("SiT-tiny/2", ("tiny",), {}),
    "irepa": ("SiT-tiny/2", ("tiny",), {}),
    "reg": ("SiT-tiny/2", ("tiny",), {}),
    "urepa": ("USiT-tiny/2", ("tiny",), {}),
    "gmem": ("SiT-tiny/2", ("tiny",), {}),
    "haste": ("SiT-tiny/2", ("tiny",), {}),
}


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous().reshape(-1)  # 0-dim tensors (step counters) too
    return hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + t.view(torch.uint8).numpy().tobytes()).hexdigest()


def state_digest(state: object) -> str:
    """One SHA-256 over every tensor of a (nested) state dict, in key order."""
    h = hashlib.sha256()

    def walk(prefix: str, x: object) -> None:
        if isinstance(x, torch.Tensor):
            h.update(f"{prefix}={tensor_digest(x)}\n".encode())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(f"{prefix}.{k}", x[k])
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}[{i}]", v)
        else:
            h.update(f"{prefix}:{x!r}\n".encode())

    walk("", state)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def golden(work: Path) -> dict:
    images = make_demo_images(work / "images", per_class=4, seed=3)
    cache = work / "cache"
    precompute(PrecomputeConfig(data=str(images), out=str(cache), resolution=64, vae="tiny", teachers=("tiny",), flip=True,
                                shard_size=8, batch_size=8, device="cpu", workers=1, processes=False, quiet=True,
                                teacher_layers={"tiny": "2"}, feature_dtype="float32"))
    out: dict = {"torch": torch.__version__, "runs": {}}
    for method, (model, teachers, options) in RUNS.items():
        run = work / f"run-{method}"
        base = dict(cache=str(cache), out=str(run), model=model, teachers=teachers, method=method, method_options=options,
                    batch_size=8, ckpt_every=2, log_every=1, num_workers=0, device="cpu", quiet=True, seed=7)
        train(TrainConfig(**base, max_steps=2))
        train(TrainConfig(**base, max_steps=4))  # a resume
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        timing = ("time", "per_sec", "wait", "mem")  # clock and memory readings differ run to run
        losses = [{k: v for k, v in r.items() if not any(w in k for w in timing)} for r in rows]
        ckpt = load_checkpoint(latest_checkpoint(run))
        record = {"losses": losses, "model": state_digest(ckpt.model), "ema": state_digest(ckpt.ema),
                  "optimizer": state_digest(ckpt.optimizer)}
        samples = {}
        for sampler in ("ode", "sde"):
            res = sample(run, work / f"samples-{method}-{sampler}",
                         SampleConfig(num=3, steps=3, sampler=sampler, batch_size=2, device="cpu", grid=0, quiet=True,
                                      cfg_scale=1.5, bank=str(cache) if method == "gmem" else None))
            assert res.npz is not None
            samples[sampler] = {"npz": file_digest(res.npz),
                                "images": [file_digest(p) for p in sorted((res.out / "images").iterdir())]}
        record["samples"] = samples
        out["runs"][method] = record
        print(f"{method}: loss {losses[-1]['loss']!r}, model {record['model'][:12]}", file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--compare", type=Path, help="an earlier record: exit 1 naming every difference")
    args = p.parse_args()
    # One thread: CPU reductions change in the last bits with the thread count, and the record is
    # compared bit for bit (the recorded baseline was made single-threaded).
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        record = golden(Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    if args.compare:
        old = json.loads(args.compare.read_text())
        diffs = [f"{m}.{part}" for m in old["runs"] for part in old["runs"][m] if old["runs"][m][part] != record["runs"].get(m, {}).get(part)]
        print("identical to " + str(args.compare) if not diffs else "differs: " + ", ".join(diffs))
        sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
