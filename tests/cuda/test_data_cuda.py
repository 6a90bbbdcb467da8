"""The trainer's loader on the GPU: pinned batches from DataLoader workers, copied without
blocking, arrive equal to the CPU path's tensors."""

from __future__ import annotations

import pytest
import torch

from repa_cache.cache.format import LATENTS, LatentNorm
from repa_cache.cache.reader import CacheReader
from repa_cache.train.data import CacheBatches, DataConfig, make_loader, to_device

pytestmark = pytest.mark.cuda

TEACHERS = ("tiny",)
STEPS = 6  # more than one epoch of the 21-sample cache at batch 8


def test_pinned_non_blocking_batches_equal_the_cpu_path(tiny_cache, device):
    norm = LatentNorm.of_latents(CacheReader(tiny_cache, groups=[LATENTS]).group(LATENTS).meta.model)
    cfg = DataConfig(str(tiny_cache), TEACHERS, global_batch=8, seed=5, num_workers=2)
    pin = device.type == "cuda"
    loader = make_loader(CacheBatches(cfg), 0, STEPS, pin_memory=pin)
    moved = []
    for step, batch in enumerate(loader):
        assert int(batch["step"]) == step
        if pin:
            keys = ("latents/mean", "latents/std", "label", "teachers/tiny/patch")
            assert all(batch[k].is_pinned() for k in keys), "the loader must deliver pinned batches"
        torch.manual_seed(step)
        moved.append(to_device(batch, norm, TEACHERS, device))  # non-blocking copies; no sync before every step is queued
        del batch  # the pinned source may be released while its copy is in flight
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    assert len(moved) == STEPS

    reference = CacheBatches(DataConfig(str(tiny_cache), TEACHERS, global_batch=8, seed=5, num_workers=0))
    for step, b in enumerate(moved):
        x, y, feats = b.x, b.y, b.patch
        ref = reference[step]  # the same global step read in this process, not pinned
        assert x.device == y.device == feats[0].device == device
        # labels and teacher tokens: bit-equal to the CPU path's own to_device
        cpu = to_device(ref, norm, TEACHERS, torch.device("cpu"))
        y_cpu, f_cpu = cpu.y, cpu.patch
        assert torch.equal(y.cpu(), y_cpu)
        assert feats[0].dtype == torch.float32 and torch.equal(feats[0].cpu(), f_cpu[0])
        # the latent sample: mean + std * eps with the same eps drawn on the device, bit-equal
        torch.manual_seed(step)
        mean, std = ref["mean"].to(device), ref["std"].to(device)  # blocking copies
        want = norm.to_model(mean + std * torch.randn_like(mean))
        assert torch.equal(x, want), f"step {step}: latents differ from a blocking copy by {(x - want).abs().max().item():.3g}"
