"""The cache-backed trainer end to end on the tiny cache: resume equals no resume (also after
SIGKILL), torchrun/gloo data split, refusals with exit 2, divergence stops the run naming the first
bad step and keeps the last good checkpoint, world size and per-rank throughput in metrics.jsonl."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from repa_cache.cache.errors import UsageError
from repa_cache.train import loop
from repa_cache.train.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint
from repa_cache.train.config import OptimConfig, TrainConfig
from repa_cache.train.data import CacheBatches, DataConfig, epoch_order
from repa_cache.train.hooks import TrainingDiverged
from repa_cache.train.loop import train
from repa_cache.train.methods import base as step_mod

from ..cache.shards import index_entries, num_chunks_of
from ..conftest import HUNG

ROOT = Path(__file__).resolve().parents[2]


def cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="SiT-tiny/2", batch_size=8, max_steps=8, ckpt_every=4, log_every=4, num_workers=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(cache=str(cache), out=str(out), **base)


def _state(run: Path) -> Checkpoint:
    return load_checkpoint(latest_checkpoint(run))


def _assert_same_state(a: Checkpoint, b: Checkpoint) -> None:
    assert a.step == b.step
    for part in ("model", "ema"):
        for k, v in getattr(a, part).items():
            assert torch.equal(v, getattr(b, part)[k]), f"{part}.{k} differs"
    sa, sb = a.optimizer["state"], b.optimizer["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}.{k} differs"


def test_resume_equals_uninterrupted(tiny_cache, tmp_path):
    train(cfg(tiny_cache, tmp_path / "a", max_steps=8))
    first = train(cfg(tiny_cache, tmp_path / "b", max_steps=4))
    assert first.step == 4
    second = train(cfg(tiny_cache, tmp_path / "b", max_steps=8))
    assert second.resumed_from == 4 and second.step == 8
    _assert_same_state(_state(tmp_path / "a"), _state(tmp_path / "b"))
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [4, 8]
    assert {"loss", "denoise", "repa", "grad_norm", "cos/tiny", "img_per_sec", "data_wait", "world_size"} <= set(lines[0])


def test_loader_workers_default(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert loop.loader_workers(3, cuda, 8) == 3 and loop.loader_workers(0, cpu, 1) == 0  # asked: as asked
    assert loop.loader_workers(None, cpu, 1) == 2  # the CPU trains on its own cores
    for cores, ranks, want in ((96, 8, 8), (64, 8, 7), (16, 8, 2), (8, 1, 7), (128, None, 8)):
        monkeypatch.setattr(loop.os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert loop.loader_workers(None, cuda, ranks) == want, (cores, ranks)


def test_metrics_report_world_size_and_per_rank_throughput(tiny_cache, tmp_path, capsys):
    run = tmp_path / "r"
    train(cfg(tiny_cache, run, max_steps=4, log_every=2, quiet=False))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4]
    for m in lines:
        assert m["world_size"] == 1
        assert m["img_per_sec_rank_min"] == m["img_per_sec_rank_max"] == m["img_per_sec"] > 0
        assert m["data_wait_rank_max"] == m["data_wait"]
    out, err = capsys.readouterr()
    assert "world size 1 on 1 node, batch 8 per rank (8 global), backend none, device cpu, 0 loader workers per rank" in err.splitlines()
    status = [x for x in out.splitlines() if x.startswith("step ")]
    assert len(status) == 2 and " img/s data-wait " in status[0] and "slowest rank" not in status[0]


def test_sigkill_then_rerun_equals_uninterrupted(tiny_cache, tmp_path):
    args = [sys.executable, "-m", "repa_cache.cli", "train", "--cache", str(tiny_cache), "--model", "SiT-tiny/2",
            "--batch-size", "8", "--max-steps", "40", "--ckpt-every", "5", "--log-every", "5", "--workers", "0",
            "--device", "cpu", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while latest_checkpoint(killed) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = latest_checkpoint(killed)
    assert kept is not None, proc.stderr.read().decode()
    step_at_kill = load_checkpoint(kept).step
    assert step_at_kill < 40, "the run finished before it could be killed; the test proves nothing"
    out = subprocess.run(args + ["--out", str(killed)], cwd=ROOT, capture_output=True, text=True, timeout=HUNG)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"run {killed}: step 40 (resumed from step {step_at_kill});") and out.stderr == ""  # -q
    train(cfg(tiny_cache, tmp_path / "clean", max_steps=40, ckpt_every=5, log_every=5))
    _assert_same_state(_state(tmp_path / "clean"), _state(killed))


def test_ranks_get_disjoint_equal_slices_of_the_global_batch(tiny_cache):
    dc = DataConfig(str(tiny_cache), ("tiny",), global_batch=8, seed=3, num_workers=0, block_size=4, window_blocks=2)
    single = CacheBatches(dc)
    ranks = [CacheBatches(dc, rank=r, world_size=2) for r in range(2)]
    for step in range(2 * single.batches_per_epoch + 1):  # crosses epoch boundaries
        idx, views = single.indices(step)
        parts = [r.indices(step) for r in ranks]
        assert [len(p[0]) for p in parts] == [4, 4]
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), idx)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), views)
        assert len(set(idx.tolist())) == 8  # no duplicates within a batch
    with pytest.raises(UsageError, match="--batch-size 8 is not divisible by the world size 3"):
        CacheBatches(dc, rank=0, world_size=3)


def test_epoch_order_is_a_permutation_and_depends_on_seed_and_epoch():
    valid = np.array([0, 1, 2, 4, 5, 6, 7, 9, 10, 11])
    a = epoch_order(valid, seed=0, epoch=0, block_size=3, window_blocks=2)
    assert sorted(a.tolist()) == valid.tolist()
    np.testing.assert_array_equal(a, epoch_order(valid, 0, 0, 3, 2))
    assert not np.array_equal(a, epoch_order(valid, 0, 1, 3, 2))
    assert not np.array_equal(a, epoch_order(valid, 1, 0, 3, 2))


def test_batches_pair_latent_and_features_from_the_same_view(tiny_cache):
    from repa_cache.cache.reader import CacheReader

    ds = CacheBatches(DataConfig(str(tiny_cache), ("tiny",), global_batch=8, num_workers=0))
    batch = ds[0]
    idx, views = batch["index"].numpy(), batch["view"].numpy()
    full = CacheReader(tiny_cache).read(idx)
    rows = np.arange(len(idx))
    np.testing.assert_array_equal(batch["latents/mean"].numpy(), full["latents/mean"][rows, views])
    np.testing.assert_array_equal(batch["teachers/tiny/patch"].numpy(), full["teachers/tiny/patch"][rows, views])
    assert set(views.tolist()) <= {0, 1}


@pytest.mark.slow
def test_torchrun_two_gloo_processes(tiny_cache, tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(
        "import json, sys, torch.distributed as dist\n"
        "from repa_cache.train.data import CacheBatches, DataConfig\n"
        "dist.init_process_group('gloo')\n"
        "ds = CacheBatches(DataConfig(sys.argv[1], ('tiny',), global_batch=8, num_workers=0), dist.get_rank(), dist.get_world_size())\n"
        "mine = [ds[s]['index'].tolist() for s in range(3)]\n"
        "allr = [None, None]\n"
        "dist.all_gather_object(allr, mine)\n"
        "if dist.get_rank() == 0: open(sys.argv[2], 'w').write(json.dumps(allr))\n"
        "dist.destroy_process_group()\n"
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(torchrun + [str(script), str(tiny_cache), str(tmp_path / "idx.json")], env=env, capture_output=True, text=True, timeout=HUNG)
    assert res.returncode == 0, res.stderr[-2000:]
    per_rank = json.loads((tmp_path / "idx.json").read_text())
    single = CacheBatches(DataConfig(str(tiny_cache), ("tiny",), global_batch=8, num_workers=0))
    for step in range(3):
        a, b = per_rank[0][step], per_rank[1][step]
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == single.indices(step)[0].tolist()
    # The trainer itself under torchrun (DDP on gloo): two steps and a checkpoint.
    run = tmp_path / "ddp"
    res = subprocess.run(
        torchrun + ["-m", "repa_cache.cli", "train", "--cache", str(tiny_cache), "--out", str(run), "--model", "SiT-tiny/2",
                    "--batch-size", "8", "--max-steps", "2", "--ckpt-every", "2", "--log-every", "1", "--workers", "0", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=HUNG,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_checkpoint(latest_checkpoint(run)).step == 2
    assert "world size 2 on 1 node, batch 4 per rank (8 global), backend gloo, device cpu, 0 loader workers per rank" in res.stderr
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]  # rank 0 alone writes
    for m in lines:
        assert m["world_size"] == 2
        assert 0 < m["img_per_sec_rank_min"] <= m["img_per_sec_rank_max"]
        assert m["img_per_sec"] == pytest.approx(m["img_per_sec_rank_min"] + m["img_per_sec_rank_max"])
    assert f"img/s (slowest rank {lines[-1]['img_per_sec_rank_min']:.1f})" in res.stdout


@pytest.mark.slow
def test_torchrun_non_finite_loss_on_one_rank_stops_every_rank_before_the_next_checkpoint(tiny_cache, tmp_path):
    """Rank 1 alone sees a NaN loss at step 3; the gradient all-reduce carries it to rank 0, whose
    own loss is finite until step 4. Both ranks must stop at the check of step 4, naming step 3,
    and rank 0 must not write step-4."""
    script = tmp_path / "nan_on_rank1.py"
    script.write_text(
        "import itertools, math, sys, torch.distributed as dist\n"
        "from repa_cache.train import config, hooks, loop\n"
        "from repa_cache.train.methods import base as step\n"
        "real, calls = step.repa_loss, itertools.count()\n"
        "def repa_loss(zs, targets):\n"
        "    repa, cos = real(zs, targets)\n"
        "    return (repa * math.nan if next(calls) == 3 and dist.get_rank() == 1 else repa), cos\n"
        "step.repa_loss = repa_loss\n"
        "cfg = config.TrainConfig(cache=sys.argv[1], out=sys.argv[2], model='SiT-tiny/2', batch_size=8, max_steps=8,\n"
        "                       ckpt_every=2, log_every=4, num_workers=0, device='cpu', quiet=True)\n"
        "try:\n"
        "    loop.train(cfg)\n"
        "    msg = 'finished'\n"
        "except hooks.TrainingDiverged as e:\n"
        "    msg = str(e)\n"
        "open(f'{sys.argv[2]}.rank{dist.get_rank()}', 'w').write(msg)\n"
        "dist.destroy_process_group()\n"
    )
    run = tmp_path / "ddp-nan"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(torchrun + [str(script), str(tiny_cache), str(run)], env=env, capture_output=True, text=True, timeout=HUNG)
    assert res.returncode == 0, res.stderr[-2000:]
    kept = latest_checkpoint(run)
    assert kept is not None and load_checkpoint(kept).step == 2
    tail = f"; stopped. Last good checkpoint: {kept}"
    rank0, rank1 = ((tmp_path / f"ddp-nan.rank{r}").read_text() for r in range(2))
    assert rank0 == f"loss became non-finite at step 3 (on another rank){tail}"
    assert rank1.startswith("loss became non-finite at step 3 (denoise ") and rank1.endswith(f", repa nan){tail}")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--teacher", "dinov2-vit-b"], "error: teacher 'dinov2-vit-b' is not in the cache"),
        (["--model", "SiT-S/4"], "error: teacher 'tiny' has 256 tokens but SiT-S/4 on 32x32 latents has 64"),
        (["--encoder-depth", "9"], "error: --encoder-depth 9 is outside the model's blocks 1..4"),
        (["--encoder-depth", "0"], "error: --encoder-depth 0 is outside the model's blocks 1..4"),
        (["--workers", "-1"], "error: --workers -1: must not be negative"),
        (["--holdout", "-2", "--proj-coeff", "-0.5"], "error: --holdout -2, --proj-coeff -0.5: must not be negative"),
        (["--lr", "0"], "error: --lr must be positive, not 0.0"),
        (["--model", "SiT-Q/2"], "error: unknown model 'SiT-Q/2'"),
        (["--batch-size", "64"], "error: the cache has 21 usable samples, fewer than one batch of 64"),
    ],
)
def test_bad_train_arguments_exit_2(tiny_cache, tmp_path, run_cli, extra, message):
    code, _, err = run_cli(["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "r"), "--model", "SiT-tiny/2",
                      "--batch-size", "8", "--max-steps", "1", "--workers", "0", "--quiet", *extra])
    assert code == 2
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_uncommitted_or_damaged_cache_refused(tiny_cache, tmp_path, run_cli):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_cache, bad)
    (bad / "_commits" / "teachers" / "tiny.json").unlink()
    code, _, err = run_cli(["train", "--cache", str(bad), "--out", str(tmp_path / "r"), "--model", "SiT-tiny/2", "--batch-size", "8"])
    assert code == 2 and "group 'teachers/tiny' of" in err and "is not committed" in err
    shutil.rmtree(bad)
    shutil.copytree(tiny_cache, bad)
    shard = sorted(p for p in (bad / "latents" / "mean" / "c").rglob("*") if p.is_file())[1]
    shard.unlink()
    code, _, err = run_cli(["train", "--cache", str(bad), "--out", str(tmp_path / "r"), "--model", "SiT-tiny/2", "--batch-size", "8"])
    assert code == 2 and "shard 1 of 'mean' is missing" in err


def test_resume_with_changed_config_refused(tiny_cache, tmp_path):
    train(cfg(tiny_cache, tmp_path / "r", max_steps=2, ckpt_every=2))
    with pytest.raises(UsageError, match=r"cannot resume .*the config changed \(proj_coeff: 0.5 -> 0.25\)"):
        train(cfg(tiny_cache, tmp_path / "r", max_steps=4, proj_coeff=0.25))


def test_divergence_stops_with_step_and_keeps_last_good_checkpoint(tiny_cache, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"loss became non-finite at step (\d+) .*Last good checkpoint: .*step-0000000\d\.pt") as e:
        train(cfg(tiny_cache, run, max_steps=50, ckpt_every=1, optim=OptimConfig(lr=1e30, grad_clip=1e30)))
    bad = int(re.search(r"at step (\d+) ", str(e.value)).group(1))
    kept = load_checkpoint(latest_checkpoint(run))
    assert kept.step == bad  # checked before every save: the state after steps 0..bad-1
    assert all(torch.isfinite(v).all() for v in kept.model.values() if v.is_floating_point())


def _nan_repa_loss_at(monkeypatch, bad_step: int) -> None:
    """Make the REPA loss of one step NaN (the loop calls repa_loss once per step, from step 0)."""
    real, calls = step_mod.repa_loss, itertools.count()

    def repa_loss(zs, targets):
        repa, cos = real(zs, targets)
        return (repa * math.nan if next(calls) == bad_step else repa), cos

    monkeypatch.setattr(step_mod, "repa_loss", repa_loss)


@pytest.mark.parametrize(
    "bad_step, max_steps, log_every, ckpt_every, kept_step",
    [
        (4, 50, 4, 3, 3),  # found at the checkpoint of step 6, between log steps: step-6 is never written
        (1, 50, 5, 100, None),  # found at the first log step; no checkpoint yet, no metrics line
        (6, 7, 100, 2, 6),  # the last step: found at the end of the run, before its checkpoint
    ],
)
def test_non_finite_step_is_named_when_checked_only_at_log_and_checkpoint_steps(
    tiny_cache, tmp_path, monkeypatch, bad_step, max_steps, log_every, ckpt_every, kept_step
):
    run = tmp_path / "nan"
    _nan_repa_loss_at(monkeypatch, bad_step)
    with pytest.raises(TrainingDiverged) as e:
        train(cfg(tiny_cache, run, max_steps=max_steps, log_every=log_every, ckpt_every=ckpt_every))
    msg = str(e.value)
    assert msg.startswith(f"loss became non-finite at step {bad_step} (denoise "), msg
    assert ", repa nan); stopped. Last good checkpoint: " in msg
    kept = latest_checkpoint(run)
    assert msg.endswith(str(kept) if kept else "none")
    if kept_step is None:
        assert kept is None and not (run / "metrics.jsonl").exists()
        return
    state = load_checkpoint(kept)
    assert state.step == kept_step <= bad_step
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in getattr(state, part).values() if v.is_floating_point())
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] if log_every <= bad_step else []
    assert all(s <= bad_step for s in steps)


def test_dry_run_reads_geometry_and_scale_from_the_cache(tiny_cache, tmp_path):
    from repa_cache.train.loop import describe_run

    resolved = json.loads(describe_run(cfg(tiny_cache, tmp_path / "d"), dry_run=True))
    assert resolved["model"]["input_size"] == 32 and resolved["model"]["in_channels"] == 4
    assert resolved["model"]["num_classes"] == 4 and resolved["model"]["z_dims"] == [32]
    assert resolved["latent_norm"] == {"scale": [0.18215], "shift": [0.0]}
    assert not (tmp_path / "d").exists()


def test_overfits_a_handful_of_cached_samples(tiny_cache, tmp_path):
    """Both losses fall on 21 cached samples. The REPA cosine is bounded well below 1 here: near
    t = 1 the student's input carries almost nothing about which sample it is."""
    run = tmp_path / "fit"
    train(cfg(tiny_cache, run, max_steps=200, log_every=1, ckpt_every=200, optim=OptimConfig(lr=1e-3)))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = lines[0]
    last = {k: float(np.mean([m[k] for m in lines[-20:]])) for k in ("denoise", "repa", "cos/tiny")}
    assert last["denoise"] < first["denoise"] / 2, (first, last)
    assert last["cos/tiny"] > 3 * max(first["cos/tiny"], 0.02) and last["repa"] < first["repa"] - 0.15, (first, last)


def test_holdout_samples_are_never_trained_on(tiny_cache):
    from repa_cache.cache.reader import CacheReader

    valid = CacheReader(tiny_cache).valid_indices()
    ds = CacheBatches(DataConfig(str(tiny_cache), ("tiny",), global_batch=4, num_workers=0, holdout=5))
    seen = set()
    for step in range(3 * ds.batches_per_epoch):
        seen |= set(ds.indices(step)[0].tolist())
    assert seen <= set(valid[:-5].tolist()) and not seen & set(valid[-5:].tolist())
    assert len(seen) >= len(valid) - 5 - 3  # drop-last leaves at most batch-1 out of an epoch


@pytest.mark.parametrize("damage, workers", [("swap", 0), ("flip", 0), ("flip", 2)])
def test_a_shard_damaged_after_commit_stops_training_naming_it(tiny_cache, tmp_path, run_cli, damage, workers):
    """Shard objects swapped between two shards (each still decodes) or a flipped bit in every chunk
    of a shard: the trainer checks each chunk it reads against the shard records, and stops naming
    the shard."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_cache, bad)
    shards = sorted(p for p in (bad / "latents" / "mean" / "c").rglob("*") if p.is_file())
    a, b = shards[0].read_bytes(), shards[1].read_bytes()
    if damage == "swap":
        shards[0].write_bytes(b)
        shards[1].write_bytes(a)
        why = (r"is not the object its record describes \(its index differs: a swapped, stale or truncated shard\) "
               r"\(damaged cache; run `repa verify`\)")
    else:
        flipped = bytearray(a)
        for offset, length in index_entries(a, num_chunks_of(shards[0])):  # whichever view of its samples a step draws
            if offset != 2**64 - 1:  # a chunk that was written
                flipped[int(offset) + int(length) // 2] ^= 0x10
        shards[0].write_bytes(bytes(flipped))
        why = r"fails its checksum: its \d+ bytes differ from those written \(damaged bytes\)"
    args = ["train", "--cache", str(bad), "--model", "SiT-tiny/2", "--batch-size", "8", "--max-steps", "4", "--workers", str(workers),
            "--device", "cpu", "--quiet"]
    code, _, err = run_cli([*args, "--out", str(tmp_path / "r")])
    errors = [line for line in err.splitlines() if not line.startswith("world size ")]  # the start-up status line
    # (from a loader worker process too: one line, not torch's "Caught CacheError in DataLoader worker" and its traceback)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert re.fullmatch(rf"error: group 'latents' of .*: shard [01] of 'mean' {why}", errors[0]), errors[0]
    assert latest_checkpoint(tmp_path / "r") is None


def test_bad_device_and_out_exit_2(tiny_cache, tmp_path, run_cli):
    base = ["train", "--cache", str(tiny_cache), "--model", "SiT-tiny/2", "--batch-size", "8", "--max-steps", "1", "--workers", "0"]
    code, _, err = run_cli([*base, "--out", str(tmp_path / "r"), "--device", "foo"])
    assert code == 2 and err.strip() == "error: unknown device 'foo'; use auto, cpu, cuda or cuda:N", err
    if not torch.cuda.is_available():
        code, _, err = run_cli([*base, "--out", str(tmp_path / "r"), "--device", "cuda"])
        assert code == 2 and err.strip() == "error: --device cuda was asked for but no CUDA device is available", err
    (tmp_path / "file").write_text("mine")
    code, _, err = run_cli([*base, "--out", str(tmp_path / "file")])
    assert code == 2 and err.strip() == f"error: --out {tmp_path / 'file'} is an existing file, not a run folder", err
    assert (tmp_path / "file").read_text() == "mine"


def test_a_run_records_its_paths_absolute_and_its_optimiser_settings(tiny_cache, tmp_path, monkeypatch, run_cli):
    """Relative --cache and --out are recorded absolute (align and sample read the cache from the
    run, from any folder); the optimiser options land in config.json."""
    monkeypatch.chdir(tiny_cache.parent)
    code, _, err = run_cli(["train", "--cache", tiny_cache.name, "--out", str(Path(os.path.relpath(tmp_path / "r"))), "--model",
                            "SiT-tiny/2", "--batch-size", "8", "--max-steps", "1", "--workers", "0", "--device", "cpu", "-q",
                            "--ema-decay", "0.99", "--grad-clip", "0", "--adam-betas", "0.9,0.95", "--weight-decay", "0.01",
                            "--keep-checkpoints", "3", "--ema-warmup", "--no-tf32"])
    assert code == 0, err
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["card"]["train"]
    assert (saved["cache"], saved["out"]) == (str(tiny_cache), str(tmp_path / "r"))
    assert saved["optim"] == {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.01, "grad_clip": 0.0, "ema_decay": 0.99,
                              "ema_warmup": True}
    assert (saved["keep_checkpoints"], saved["tf32"]) == (3, False)


def test_resuming_needs_only_what_changes(tiny_cache, tmp_path, run_cli):
    """A run started with non-default options resumes from `--cache --out --max-steps`: the options
    not typed take the values the run recorded (no "config changed" refusal), and one typed
    differently is still refused."""
    run = tmp_path / "r"
    first = ["train", "--cache", str(tiny_cache), "--out", str(run), "--model", "SiT-tiny/2", "--batch-size", "8",
             "--encoder-depth", "1", "--lr", "0.001", "--ema-decay", "0.5", "--path", "cosine", "--ckpt-every", "1",
             "--max-steps", "1", "--workers", "0", "--device", "cpu", "-q"]
    code, _, err = run_cli(first)
    assert code == 0, err
    code, _, err = run_cli(["train", "--cache", str(tiny_cache), "--out", str(run), "--max-steps", "2", "--workers", "0", "-q"])
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())["card"]["train"]
    assert (saved["model"], saved["batch_size"], saved["encoder_depth"], saved["optim"]["lr"], saved["optim"]["ema_decay"],
            saved["transport"]["path"], saved["max_steps"]) == ("SiT-tiny/2", 8, 1, 0.001, 0.5, "cosine", 2)
    code, _, err = run_cli(["train", "--cache", str(tiny_cache), "--out", str(run), "--max-steps", "3", "--lr", "0.01", "-q"])
    assert code == 2 and "the config changed (optim: " in err


def test_a_config_file_or_the_dry_runs_output_gives_the_same_run(tiny_cache, tmp_path, run_cli, monkeypatch):
    """`--dry-run` printed to a file and fed back with --config, and a hand-written TOML with the same
    options, train the run the command line trains: equal recorded configs, equal weights. Options
    typed next to --config override the file."""
    opts = ["--model", "SiT-tiny/2", "--batch-size", "8", "--encoder-depth", "1", "--lr", "0.001", "--ema-warmup",
            "--adam-betas", "0.9,0.95", "--path", "cosine", "--max-steps", "2", "--workers", "0", "--device", "cpu", "-q"]
    code, _, err = run_cli(["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "a"), *opts])
    assert code == 0, err
    code, dry, err = run_cli(["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "b"), *opts, "--dry-run"])
    assert code == 0, err
    (tmp_path / "dry.json").write_text(dry)
    (tmp_path / "run.toml").write_text(
        f'cache = "{tiny_cache}"\nout = "c"\nmodel = "SiT-tiny/2"\nbatch_size = 8\nencoder_depth = 1\nmax_steps = 2\n'
        'num_workers = 0\ndevice = "cpu"\nquiet = true\n[optim]\nlr = 0.001\nema_warmup = true\nbetas = [0.9, 0.95]\n'
        '[transport]\npath = "cosine"\n')
    code, _, err = run_cli(["train", "--config", str(tmp_path / "dry.json")])
    assert code == 0, err
    monkeypatch.chdir(tmp_path)  # the TOML's relative out is taken from here, as on the command line
    code, _, err = run_cli(["train", "--config", "run.toml"])
    assert code == 0, err

    def recorded(run: str) -> dict:
        d = json.loads((tmp_path / run / "config.json").read_text())["card"]["train"]
        assert d.pop("out") == str(tmp_path / run)
        return d

    assert recorded("a") == recorded("b") == recorded("c")
    assert recorded("a")["optim"] == {"lr": 0.001, "betas": [0.9, 0.95], "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.9999,
                                      "ema_warmup": True}
    for run in ("b", "c"):
        _assert_same_state(_state(tmp_path / "a"), _state(tmp_path / run))

    # typed beats the file; the file's other values hold (and a resume of d needs no option again)
    code, _, err = run_cli(["train", "--config", "run.toml", "--out", "d", "--max-steps", "1"])
    assert code == 0, err
    d = recorded("d")
    assert (d["max_steps"], d["optim"]["lr"], d["transport"]["path"]) == (1, 0.001, "cosine")


@pytest.mark.parametrize(("text", "message"), [
    ('max_step = 3', "unknown training config key 'max_step' (did you mean 'max_steps'?)"),
    ('max_steps = "3"', "training config key 'max_steps' must be an integer, not '3'"),
    ('[optim]\nbetas = [0.9]', "training config key 'optim.betas' must be a list of 2 numbers, not [0.9]"),
    ('teachers = "tiny"', "training config key 'teachers' must be a list of strings, not 'tiny'"),
    ('out = "r', "not valid TOML"),
])
def test_a_bad_config_file_is_one_line(tmp_path, run_cli, text, message):
    (tmp_path / "run.toml").write_text(text)
    code, _, err = run_cli(["train", "--config", str(tmp_path / "run.toml"), "--cache", "c", "--out", str(tmp_path / "r")])
    assert code == 2 and err.startswith(f"error: --config {tmp_path / 'run.toml'}: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_a_record_without_the_newer_fields_reads_as_their_defaults():
    """A run recorded before ``tf32`` and ``optim.ema_warmup`` existed resumes: the missing fields,
    also inside a part, are the defaults they had then."""
    defaults = TrainConfig(cache="", out="").to_json()
    old = {k: v for k, v in defaults.items() if k != "tf32"}
    old["optim"] = {k: v for k, v in defaults["optim"].items() if k != "ema_warmup"} | {"lr": 0.5}
    assert loop.with_defaults(old, defaults) == defaults | {"optim": defaults["optim"] | {"lr": 0.5}}


def test_group_records_typed_as_stage_two_reads_them(tiny_cache):
    from repa_cache.cache.format import LatentNorm, LatentsRecord, TeacherRecord
    from repa_cache.cache.reader import CacheReader

    reader = CacheReader(tiny_cache)
    assert LatentsRecord.of(reader.group("latents").meta) == LatentsRecord(32, 4, LatentNorm((0.18215,), (0.0,)))
    assert TeacherRecord.of(reader.group("tiny").meta) == TeacherRecord("tiny", 32, 256)
