"""``repa train`` on the GPU in its own processes: under torchrun (one rank, NCCL), and killed
with SIGKILL then run again, which must end exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repa_cache.train.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, training_checkpoints

from ..conftest import HUNG

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[2]


def _train_args(cache: Path, out: Path, device: torch.device, **opts: object) -> list[str]:
    base = {"model": "SiT-tiny/2", "batch-size": 8, "workers": 0, "device": device.type, **opts}
    return ["train", "--cache", str(cache), "--out", str(out), "--quiet",
            *[a for k, v in base.items() for a in (f"--{k}", str(v))]]


def test_torchrun_one_rank_initialises_nccl_and_trains(tiny_cache, tmp_path, device, subprocess_env):
    run = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "repa_cache.cli"]
    args = _train_args(tiny_cache, run, device, **{"max-steps": 4, "ckpt-every": 4, "log-every": 2})
    args.remove("--quiet")  # the status lines go to stdout
    res = subprocess.run(torchrun + args, cwd=ROOT, env=subprocess_env, capture_output=True, text=True, timeout=HUNG)
    assert res.returncode == 0, res.stderr[-3000:]
    backend = "nccl" if device.type == "cuda" else "gloo"
    assert f"world size 1 on 1 node, batch 8 per rank (8 global), backend {backend}, device {device.type}" in res.stderr, res.stderr[-3000:]
    assert load_checkpoint(latest_checkpoint(run)).step == 4
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4]
    for m in lines:
        assert math.isfinite(m["loss"]) and math.isfinite(m["repa"]) and m["world_size"] == 1 and m["img_per_sec"] > 0
        if device.type == "cuda":
            assert 0 < m["gpu_mem_gib"] < 10, m  # a tiny model: far below the card's memory


# Deterministic kernels in the trainer's process: CUDA's flash-attention backward and cuBLAS
# otherwise may sum in another order from one run to the next, and "exact" could not be tested.
DRIVER = """\
import sys, torch
torch.use_deterministic_algorithms(True)
from repa_cache.cli import main
sys.argv = ["repa", *sys.argv[1:]]
main()
"""


def _state(run: Path) -> Checkpoint:
    return load_checkpoint(latest_checkpoint(run))


def _differences(a: Checkpoint, b: Checkpoint) -> list[str]:
    out = [f"step {a.step} != {b.step}"] if a.step != b.step else []
    for part in ("model", "ema"):
        out += [f"{part}.{k}" for k, v in getattr(a, part).items() if not torch.equal(v, getattr(b, part)[k])]
    sa, sb = a.optimizer["state"], b.optimizer["state"]
    out += [f"optimizer.{i}.{k}" for i in sa for k in sa[i] if not torch.equal(sa[i][k], sb[i][k])]
    return out


def test_sigkill_then_rerun_equals_uninterrupted_on_the_gpu(tiny_cache, tmp_path, device, subprocess_env):
    driver = tmp_path / "train_deterministic.py"
    driver.write_text(DRIVER)
    env = {**subprocess_env, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    opts = {"max-steps": 60, "ckpt-every": 10, "log-every": 10}

    def cmd(out: Path) -> list[str]:
        return [sys.executable, str(driver), *_train_args(tiny_cache, out, device, **opts)]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Killed once the second checkpoint file appears (step 20): the first one is complete by then,
    # and the kill lands anywhere from inside the second one's save to a later step.
    deadline = time.time() + 240
    while len(training_checkpoints(killed)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(training_checkpoints(killed)) >= 2, proc.stderr.read().decode()[-3000:]
    again = subprocess.run(cmd(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=HUNG)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = re.search(rf"resuming {re.escape(str(killed))} from step (\d+)", again.stderr)
    assert resumed is not None, again.stderr[-3000:]
    step_at_kill = int(resumed.group(1))
    assert step_at_kill in (10, 20, 30, 40, 50), "the run finished before it could be killed; the test proves nothing"

    clean = tmp_path / "clean"
    res = subprocess.run(cmd(clean), cwd=ROOT, env=env, capture_output=True, text=True, timeout=HUNG)
    assert res.returncode == 0, res.stderr[-3000:]
    diff = _differences(_state(clean), _state(killed))
    if diff:  # tell a resume bug from run-to-run nondeterminism of the kernels
        twice = tmp_path / "clean-again"
        subprocess.run(cmd(twice), cwd=ROOT, env=env, capture_output=True, text=True, timeout=HUNG, check=True)
        noise = _differences(_state(clean), _state(twice))
        pytest.fail(f"resumed from step {step_at_kill} != uninterrupted in {len(diff)} tensors (e.g. {diff[:5]}); "
                    f"two uninterrupted runs differ in {len(noise)} tensors (e.g. {noise[:5]})")
