"""The training step on the GPU: bf16 autocast against fp32, fused AdamW against the unfused
update, and a ``torch.compile``d model against eager, each on the same batch and seeds."""

from __future__ import annotations

import copy

import pytest
import torch

from repa_cache.stages.devices import autocast, use_bf16
from repa_cache.train.config import OptimConfig
from repa_cache.train.loss import repa_loss
from repa_cache.train.methods import StepBatch
from repa_cache.train.model import SiTConfig, sit_config
from repa_cache.train.step import Trainer, build_trainer, train_step

pytestmark = pytest.mark.cuda

STEPS = 5


def _model_config() -> SiTConfig:
    # 16x16 latents, patch 2: 64 tokens; width 64, 4 blocks, aligned after block 2.
    return sit_config("SiT-tiny/2", input_size=16, num_classes=10, z_dims=(32,))


def _batch(device: torch.device, mcfg: SiTConfig, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, mcfg.in_channels, mcfg.input_size, mcfg.input_size, generator=g)  # (B, C, H, W)
    y = torch.randint(0, mcfg.num_classes, (batch,), generator=g)  # (B,)
    feats = [torch.randn(batch, mcfg.num_tokens, z, generator=g) for z in mcfg.z_dims]  # (B, T, Z) each
    return x.to(device), y.to(device), [f.to(device) for f in feats]


def _run(tr: Trainer, batch, steps: int = STEPS) -> list[dict[str, float]]:
    x, y, feats = batch
    out = []
    for s in range(steps):
        torch.manual_seed(1000 + s)  # times, noise and label dropout of step s: the same for every trainer
        r = train_step(tr, StepBatch(x, y, feats), s)
        out.append({"loss": r.loss.item(), "denoise": r.terms["denoise"].item(), "repa": r.terms["repa"].item(),
                    "grad_norm": r.grad_norm.item()})
    return out


def test_bf16_autocast_step_is_finite_and_close_to_fp32(device, strict_fp32):
    mcfg = _model_config()
    batch = _batch(device, mcfg)
    optim = OptimConfig(lr=1e-3)  # large enough that the weights move away from adaLN-Zero's zero output
    fp32 = build_trainer(mcfg, device, optim=optim, precision="fp32", seed=0)
    bf16 = build_trainer(mcfg, device, optim=optim, precision="bf16", seed=0)
    if device.type == "cuda":
        assert use_bf16("auto", device), "precision 'auto' must mean bf16 autocast on CUDA"
    # The bf16 trainer really runs its forward pass in bf16 (else the comparison below proves nothing).
    x, y, _ = batch
    with torch.no_grad(), autocast(device, bf16.precision):
        v, zs = bf16.fwd(x, torch.full((x.shape[0],), 0.5, device=device), y)
    assert v.dtype == torch.bfloat16 and zs[0].dtype == torch.bfloat16

    a, b = _run(fp32, batch), _run(bf16, batch)
    for s, (r32, r16) in enumerate(zip(a, b)):
        assert all(torch.isfinite(torch.tensor(list(r16.values())))), (s, r16)
        # bf16 keeps 8 bits of mantissa (relative rounding 2^-9): the losses of the same step agree
        # to 2 % (denoise, relative) and 5e-3 (REPA, a mean cosine in [-1, 1]), the gradient norms
        # to 5 %. (bf16 autocast on the CPU: within 1e-4 relative, 3e-5 and 0.3 %.)
        assert abs(r16["denoise"] - r32["denoise"]) <= 0.02 * abs(r32["denoise"]), (s, r32, r16)
        assert abs(r16["repa"] - r32["repa"]) <= 5e-3, (s, r32, r16)
        assert abs(r16["grad_norm"] - r32["grad_norm"]) <= 0.05 * r32["grad_norm"], (s, r32, r16)


def test_fused_adamw_equals_unfused_within_rounding(device):
    mcfg = _model_config()
    x, y, feats = _batch(device, mcfg)
    optim = OptimConfig(lr=1e-3)
    tr = build_trainer(mcfg, device, optim=optim, precision="fp32", seed=0)
    if device.type == "cuda":
        assert tr.opt.defaults.get("fused") is True, "the trainer's AdamW must be fused on CUDA"
        fused = tr.opt
    else:
        fused = torch.optim.AdamW(tr.model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=True)
    ref = copy.deepcopy(tr.model)
    plain = torch.optim.AdamW(ref.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, foreach=False, fused=False)
    start = [p.detach().clone() for p in ref.parameters()]
    for s in range(STEPS):
        torch.manual_seed(2000 + s)
        out = tr.transport.training_losses(tr.model, x, y)
        repa, _ = repa_loss(out.zs, feats)
        fused.zero_grad(set_to_none=True)
        (out.denoise + 0.5 * repa).backward()
        for p, q in zip(tr.model.parameters(), ref.parameters()):  # the same gradients for both updates
            q.grad = None if p.grad is None else p.grad.detach().clone()
        fused.step()
        plain.step()
    moved = max((p - p0).abs().max().item() for p, p0 in zip(ref.parameters(), start))
    assert moved > 1e-3, "the updates did not move the weights; the comparison proves nothing"
    # fp32 rounding of parameters ~0.1 in size is ~1e-8; five updates of ~1e-3 differ by far less than 1e-6.
    for (name, p), q in zip(tr.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for p, q in zip(tr.model.parameters(), ref.parameters()):
        sf, sp = fused.state[p], plain.state[q]
        torch.testing.assert_close(sf["exp_avg"], sp["exp_avg"], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(sf["exp_avg_sq"], sp["exp_avg_sq"], rtol=1e-5, atol=1e-10)
        assert float(sf["step"]) == float(sp["step"]) == STEPS


def test_compiled_model_loss_equals_eager(device):
    mcfg = _model_config()
    batch = _batch(device, mcfg)
    eager = build_trainer(mcfg, device, precision="auto", seed=0)
    compiled = build_trainer(mcfg, device, precision="auto", seed=0, compile=True)
    assert isinstance(compiled.fwd, torch._dynamo.eval_frame.OptimizedModule)
    try:
        a, b = _run(eager, batch, steps=3), _run(compiled, batch, steps=3)
    finally:
        torch._dynamo.reset()
    for s, (re, rc) in enumerate(zip(a, b)):
        # Same seeds and weights; the compiled graph fuses and reorders bf16 arithmetic: agreement
        # to 2 % (denoise, relative) and 0.01 (REPA). On the CPU (fp32) it is far tighter.
        assert abs(rc["denoise"] - re["denoise"]) <= 0.02 * abs(re["denoise"]) + 1e-3, (s, re, rc)
        assert abs(rc["repa"] - re["repa"]) <= 0.01, (s, re, rc)
