"""Gradient accumulation: K micro-steps of B/K are one step of B (same samples, same random draws,
same loss and gradients up to fp32 rounding), single process and under torchrun, and a resume may
change K."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint
from repa_cache.train.config import OptimConfig, TrainConfig, TransportConfig
from repa_cache.train.loop import train
from repa_cache.train.methods import StepBatch, make_method
from repa_cache.train.model import sit_config
from repa_cache.train.step import build_trainer, micro_batches, train_step

from ..conftest import HUNG


def test_micro_batches_cover_the_batch_in_order():
    assert micro_batches(8, 1) == [slice(0, 8)]
    assert micro_batches(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert micro_batches(7, 3) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    with pytest.raises(ValueError):
        micro_batches(2, 3)


@pytest.mark.parametrize("method", ["repa", "reg"])
@pytest.mark.parametrize("k", [2, 3])
def test_k_micro_steps_give_the_loss_and_gradients_of_one_step(method, k):
    mcfg = sit_config("SiT-tiny/2", input_size=8, num_classes=5, z_dims=(6,), projector_dim=16)
    g = torch.Generator().manual_seed(0)
    batch = StepBatch(torch.randn(6, 4, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g),
                      [torch.randn(6, mcfg.num_tokens, 6, generator=g)], [torch.randn(6, 6, generator=g)])
    results = {}
    for accum in (1, k):
        tr = build_trainer(mcfg, torch.device("cpu"), method=make_method(method), optim=OptimConfig(lr=1e-3),
                           transport=TransportConfig(label_dropout=0.5), precision="fp32", seed=4, grad_accum=accum)
        with torch.no_grad():  # off the zero init, so that every parameter gets a gradient
            for p in tr.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        torch.manual_seed(21)
        res = train_step(tr, batch, 0)
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
        results[accum] = (res, grads, tr.model.state_dict())
    (one, g1, s1), (many, gk, _) = results[1], results[k]
    torch.testing.assert_close(many.loss, one.loss, rtol=1e-5, atol=1e-6)
    assert set(many.terms) == set(one.terms)
    for name in one.terms:
        torch.testing.assert_close(many.terms[name], one.terms[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(many.grad_norm, one.grad_norm, rtol=1e-5, atol=1e-6)
    assert set(gk) == set(g1) and len(g1) == len(list(s1)) - 1  # every parameter (pos_embed is a buffer)
    for name in g1:
        torch.testing.assert_close(gk[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def _cfg(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model="SiT-tiny/2", batch_size=8, max_steps=6, ckpt_every=3, log_every=3, num_workers=0, device="cpu", quiet=True)
    base.update(kw)
    return TrainConfig(cache=str(cache), out=str(out), **base)


def _close_states(a: Path, b: Path, atol: float) -> None:
    sa, sb = load_checkpoint(latest_checkpoint(a)), load_checkpoint(latest_checkpoint(b))
    assert sa.step == sb.step
    for k, v in sa.model.items():
        torch.testing.assert_close(sb.model[k], v, rtol=0, atol=atol, msg=k)


@pytest.mark.slow
def test_a_resume_may_change_k(tiny_cache, tmp_path):
    train(_cfg(tiny_cache, tmp_path / "one"))
    train(_cfg(tiny_cache, tmp_path / "mixed", max_steps=3))
    res = train(_cfg(tiny_cache, tmp_path / "mixed", grad_accum=4))
    assert res.resumed_from == 3 and res.step == 6
    _close_states(tmp_path / "one", tmp_path / "mixed", atol=1e-5)
    # K = 2 throughout, resumed with K = 2, is exactly K = 2 uninterrupted
    train(_cfg(tiny_cache, tmp_path / "k2", grad_accum=2))
    train(_cfg(tiny_cache, tmp_path / "k2r", grad_accum=2, max_steps=3))
    train(_cfg(tiny_cache, tmp_path / "k2r", grad_accum=2))
    _close_states(tmp_path / "k2", tmp_path / "k2r", atol=0.0)


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_with_k_2_match_k_1(tiny_cache, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in (1, 2):
        res = subprocess.run(
            torchrun + ["-m", "repa_cache.cli", "train", "--cache", str(tiny_cache), "--out", str(tmp_path / f"k{k}"), "--model",
                        "SiT-tiny/2", "--batch-size", "8", "--max-steps", "2", "--ckpt-every", "2", "--workers", "0", "--device", "cpu",
                        "--grad-accum", str(k), "-q"],
            env=env, capture_output=True, text=True, timeout=HUNG,
        )
        assert res.returncode == 0, res.stderr[-2000:]
    _close_states(tmp_path / "k1", tmp_path / "k2", atol=1e-5)


def test_grad_accum_larger_than_the_batch_per_rank_is_refused(tiny_cache, tmp_path, run_cli):
    code, _, err = run_cli(["train", "--cache", str(tiny_cache), "--out", str(tmp_path / "r"), "--model", "SiT-tiny/2",
                            "--batch-size", "4", "--grad-accum", "5", "--device", "cpu"])
    assert code == 2 and err.strip() == "error: --grad-accum 5 must be between 1 and the batch per rank (4)"


def test_the_alignment_loss_sees_its_micro_batch_and_their_times():
    """``Method.alignment`` gets the step's context: each micro-batch's rows and the times drawn
    for them (here recorded by a REPA subclass; its loss stays REPA's)."""
    from repa_cache.train.methods.repa import Repa

    class Recording(Repa):
        def __init__(self) -> None:
            super().__init__()
            self.drawn, self.seen = [], []

        def draw(self, transport, batch, phase):
            self.drawn.append(super().draw(transport, batch, phase))
            return self.drawn[-1]

        def alignment(self, zs, targets, ctx):
            self.seen.append(ctx)
            return super().alignment(zs, targets, ctx)

    mcfg = sit_config("SiT-tiny/2", input_size=8, num_classes=5, z_dims=(6,), projector_dim=16)
    g = torch.Generator().manual_seed(1)
    batch = StepBatch(torch.randn(6, 4, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g),
                      [torch.randn(6, mcfg.num_tokens, 6, generator=g)])
    method = Recording()
    tr = build_trainer(mcfg, torch.device("cpu"), method=method, precision="fp32", seed=4, grad_accum=3)
    train_step(tr, batch, 0)
    (draws,) = method.drawn
    assert len(method.seen) == 3
    assert torch.equal(torch.cat([c.t for c in method.seen]), draws.t)
    for ctx, rows in zip(method.seen, micro_batches(6, 3)):
        assert torch.equal(ctx.batch.x, batch.x[rows]) and torch.equal(ctx.batch.patch[0], batch.patch[0][rows])
