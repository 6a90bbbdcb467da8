"""Methods on the GPU: HASTE's teacher blocks on the device against the CPU, and its step (the
attention term included) in bf16 autocast against fp32, on the same batch and seeds."""

from __future__ import annotations

import pytest
import torch

from repa_cache.stages.hashing import state_dict_sha256
from repa_cache.stages.teachers import TeacherTail, get_teacher, load_teacher, teacher_metadata
from repa_cache.train.config import OptimConfig
from repa_cache.train.methods import StepBatch, make_method
from repa_cache.train.methods.base import CacheContext
from repa_cache.train.model import sit_config
from repa_cache.train.step import build_trainer, train_step

pytestmark = pytest.mark.cuda


def _haste(device: torch.device):
    spec = get_teacher("tiny")
    teacher = load_teacher(spec, 256, device=device)
    method = make_method("haste")
    method.bind(CacheContext(("tiny",), {"tiny": teacher_metadata(spec, 256, layers=(2, 2))},
                             {"tiny": state_dict_sha256(teacher)}, 256))
    method.attach_teacher(teacher)
    return method


def _batch(device: torch.device, batch: int = 8) -> StepBatch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 32, 32, generator=g)  # (B, C, H, W): 16x16 tokens, the tiny teacher's grid
    y = torch.randint(0, 10, (batch,), generator=g)
    patch = torch.randn(batch, 256, 32, generator=g)
    hidden = 4 * torch.randn(batch, 257, 32, generator=g)  # tokens entering block 2 (CLS first)
    return StepBatch(x.to(device), y.to(device), [patch.to(device)], [], [hidden.to(device)])


def test_teacher_blocks_on_the_device_match_the_cpu(device, strict_fp32):
    batch = _batch(device)
    on_device = _haste(device).teacher_tail(device)(batch.hidden[0])
    on_cpu = TeacherTail(load_teacher(get_teacher("tiny"), 256), 2, 2)(batch.hidden[0].cpu())
    for a, b in zip(on_device, on_cpu):
        assert a.device.type == device.type
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4)


def test_haste_bf16_step_is_finite_and_close_to_fp32(device, strict_fp32):
    mcfg = sit_config("SiT-tiny/2", num_classes=10, z_dims=(32,))
    batch = _batch(device)
    runs = {}
    for precision in ("fp32", "bf16"):
        tr = build_trainer(mcfg, device, optim=OptimConfig(lr=1e-3), method=_haste(device), precision=precision, seed=0)
        out = []
        for s in range(3):
            torch.manual_seed(1000 + s)
            r = train_step(tr, batch, s)
            out.append({k: v.item() for k, v in r.terms.items()} | {"loss": r.loss.item(), "grad_norm": r.grad_norm.item()})
        runs[precision] = out
    for s, (r32, r16) in enumerate(zip(runs["fp32"], runs["bf16"])):
        assert all(torch.isfinite(torch.tensor(list(r16.values())))), (s, r16)
        # the attention cross-entropy (about log 256 = 5.5) from bf16 logits: within 1e-2 absolute
        # (bf16 autocast on the CPU: 3e-4)
        assert abs(r16["attn"] - r32["attn"]) <= 1e-2, (s, r32, r16)
        assert abs(r16["denoise"] - r32["denoise"]) <= 0.02 * abs(r32["denoise"]), (s, r32, r16)
        assert abs(r16["grad_norm"] - r32["grad_norm"]) <= 0.05 * r32["grad_norm"], (s, r32, r16)
