"""The samplers on the GPU: an ODE (Heun, guided) and an SDE (Euler–Maruyama) sample of a SiT
equal the CPU samples of the same model, noise and labels, within a stated tolerance."""

from __future__ import annotations

import copy

import pytest
import torch

from repa_cache.eval.samplers import SamplerConfig, sample_labels, sample_latents
from repa_cache.train.model import SiT, sit_config
from repa_cache.train.noise import SampleNoise

pytestmark = pytest.mark.cuda

N = 8
SEED = 3
CONFIGS = {
    "ode": SamplerConfig(sampler="ode", steps=8, heun=True, cfg_scale=1.5, guidance_interval=(0.0, 0.7)),
    "sde": SamplerConfig(sampler="sde", steps=8, cfg_scale=1.5, guidance_interval=(0.0, 0.7)),
}


def _model() -> SiT:
    """A tiny SiT whose velocity is far from zero: the adaLN-Zero gates and the output layer, zero
    after initialisation, get random weights too."""
    torch.manual_seed(0)
    model = SiT(sit_config("SiT-tiny/2", input_size=16, num_classes=10, z_dims=(32,)))
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(0, 0.05)
        model.final_layer.adaLN_modulation[-1].weight.normal_(0, 0.05)
        model.final_layer.linear.weight.normal_(0, 0.1)
    return model.eval().requires_grad_(False)


def _sample(model: SiT, device: torch.device, sampler: str, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial noise, sample), both on the CPU; the noise comes from per-sample CPU generators, so
    it is the same on every device."""
    cfg = model.config
    noise = SampleNoise(SEED, range(N), device)
    x1 = noise.randn((cfg.in_channels, cfg.input_size, cfg.input_size)).float()  # (N, C, H, W)
    y = sample_labels(SEED, range(N), cfg.num_classes).to(device)
    z = sample_latents(model.to(device), x1, y, CONFIGS[sampler], cfg.num_classes, step_noise=noise, precision=precision)
    assert z.device.type == device.type and z.dtype == torch.float32
    return x1.cpu(), z.cpu()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("sampler", sorted(CONFIGS))
def test_gpu_sample_equals_cpu_sample(sampler, device, strict_fp32):
    model = _model()
    x1_cpu, z_cpu = _sample(copy.deepcopy(model), torch.device("cpu"), sampler, "fp32")
    x1_gpu, z_gpu = _sample(copy.deepcopy(model), device, sampler, "fp32")
    assert torch.equal(x1_gpu, x1_cpu), "the initial noise must not depend on the device"
    moved = z_cpu - x1_cpu  # what the model did to the noise
    assert moved.norm() > 0.2 * x1_cpu.norm(), "the model barely moves the sample; the comparison proves little"
    # fp32 on both (TF32 off): summation order alone differs, through 8 steps (SDE: the score's
    # 1/t at t = 0.04 magnifies it): the change agrees to 1e-4 relative, every value to 1e-4.
    assert _rel(z_gpu - x1_gpu, moved) < 1e-4
    torch.testing.assert_close(z_gpu, z_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sampler", sorted(CONFIGS))
def test_bf16_sample_on_the_gpu_is_close_to_fp32_on_the_cpu(sampler, device):
    model = _model()
    x1, z_cpu = _sample(copy.deepcopy(model), torch.device("cpu"), sampler, "fp32")
    _, z_bf16 = _sample(copy.deepcopy(model), device, sampler, "bf16")  # what --precision auto runs on CUDA
    assert torch.isfinite(z_bf16).all()
    # bf16 autocast in the model (the integration stays float64): the change made to the noise
    # agrees to 3 % relative L2 (bf16 autocast on the CPU: 0.3 % ODE, 0.2 % SDE).
    err = _rel(z_bf16 - x1, z_cpu - x1)
    assert 0 < err < 0.03, err
