"""One REPA training step, the same for ``repa train`` and ``bench/train_step.py``.

:func:`build_trainer` makes the student, its EMA copy, AdamW (fused on CUDA) and the transport
from a model config; :func:`train_step` runs one optimiser step on a batch already on the device:

    loss = transport.training_losses(...)["denoise"] + proj_coeff * repa_loss(zs, teacher tokens)

then backward, gradient clipping, AdamW and the EMA update. The step never reads a value back
to the host: the returned scalars stay on the device until the caller asks for them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from repa_cache.stages.devices import autocast
from repa_cache.train.config import OptimConfig, TransportConfig
from repa_cache.train.loss import repa_loss
from repa_cache.train.model import SiT, SiTConfig
from repa_cache.train.transport import Transport


@dataclass
class Trainer:
    """The training state of one rank and what a step needs to update it.

    ``model`` is the bare student (its parameters are the optimiser's), ``fwd`` the module the
    forward pass goes through (the model, or its DDP and/or torch.compile wrapper).
    """

    model: SiT
    fwd: torch.nn.Module
    ema: SiT
    opt: torch.optim.Optimizer
    transport: Transport
    optim: OptimConfig
    proj_coeff: float
    device: torch.device
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on the CPU


@dataclass
class StepResult:
    """Scalars of one step, on the device (reading them is a host sync)."""

    loss: Tensor
    denoise: Tensor
    repa: Tensor
    cos: list[Tensor]  # mean cosine per teacher, detached
    grad_norm: Tensor


def build_trainer(
    model_config: SiTConfig,
    device: torch.device,
    *,
    optim: OptimConfig | None = None,
    transport: TransportConfig | None = None,
    proj_coeff: float = 0.5,
    precision: str = "auto",
    compile: bool = False,
    seed: int = 0,
    ddp: bool = False,
) -> Trainer:
    """Student, EMA, AdamW and transport for ``model_config`` on ``device``.

    Initial weights come from ``torch.manual_seed(seed)``, so every rank starts identical. The
    transport's null class is set to the model's ``num_classes`` (the row after the real classes).
    With ``ddp`` the forward pass goes through ``DistributedDataParallel`` (the process group must
    be initialised); with ``compile`` through ``torch.compile``.
    """
    optim = optim if optim is not None else OptimConfig()
    torch.manual_seed(seed)
    model = SiT(model_config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                            fused=device.type == "cuda")
    fwd: torch.nn.Module = model
    if ddp:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        fwd = torch.compile(fwd)  # type: ignore[assignment]
    tcfg = dataclasses.replace(transport if transport is not None else TransportConfig(), null_class=model_config.num_classes)
    return Trainer(model, fwd, ema, opt, Transport(tcfg), optim, proj_coeff, device, precision)


def train_step(tr: Trainer, x: Tensor, y: Tensor, feats: list[Tensor]) -> StepResult:
    """One optimiser step on clean latents x (B, C, h, w), labels y (B,) and one (B, T, D)
    teacher token tensor per projector. Randomness (times, noise, label dropout) comes from
    torch's global RNG, which the caller seeds per step."""
    with autocast(tr.device, tr.precision):
        out = tr.transport.training_losses(tr.fwd, x, y)
    denoise = out["denoise"].float()
    repa, cos = repa_loss(out["zs"], feats)
    loss = denoise + tr.proj_coeff * repa
    tr.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.optim.grad_clip)
    tr.opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(tr.ema.parameters()), list(tr.model.parameters()), 1.0 - tr.optim.ema_decay)
    return StepResult(loss, denoise, repa, cos, grad_norm)
