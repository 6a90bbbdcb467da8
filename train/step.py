"""One training step, the same for ``repa train`` and ``bench/train_step.py``.

:func:`build_trainer` makes the method's student, its EMA copy, AdamW (fused on CUDA) and the
transport from a model config; :func:`train_step` runs one optimiser step on a batch already on
the device: the method's objective (:meth:`Method.losses`; for REPA
``denoise + proj_coeff * repa``), then backward, gradient clipping, AdamW and the EMA update. The
step never reads a value back to the host: the returned scalars stay on the device until the
caller asks for them.

The phase of the run (encoder warm-up, main, main without alignment; :mod:`train.schedule`) sets
which parameters train. Parameters that do not take part in a phase are frozen for it, and the
DDP / torch.compile wrapper is rebuilt when the phase changes, so DDP never waits for a gradient
that cannot come.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from repa_cache.stages.devices import autocast
from repa_cache.train.config import OptimConfig, TransportConfig
from repa_cache.train.methods import Method, StepBatch, make_method
from repa_cache.train.model import SiT, SiTConfig
from repa_cache.train.schedule import MAIN_NO_ALIGN, WARMUP, Phases
from repa_cache.train.transport import Transport


@dataclass
class Trainer:
    """The training state of one rank and what a step needs to update it.

    ``model`` is the bare student (its parameters are the optimiser's), ``fwd`` the module the
    forward pass goes through (the model, or its DDP and/or torch.compile wrapper) in the current
    ``phase``.
    """

    model: SiT
    fwd: torch.nn.Module
    ema: SiT
    opt: torch.optim.Optimizer
    transport: Transport
    optim: OptimConfig
    method: Method
    phases: Phases
    device: torch.device
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on the CPU
    ddp: bool = False
    compile: bool = False
    grad_accum: int = 1  # micro-steps per optimiser step
    phase: str = ""
    ddp_module: torch.nn.parallel.DistributedDataParallel | None = None

    @property
    def proj_coeff(self) -> float:
        return self.method.proj_coeff

    def enter(self, step: int) -> None:
        """Make the trainer ready for global step ``step``: on a phase change, freeze what the new
        phase does not train and rebuild the forward wrapper."""
        phase = self.phases.phase(step)
        if phase == self.phase:
            return
        self.model.requires_grad_(True)
        if phase == WARMUP:
            self.model.requires_grad_(False)
            for p in self.model.warmup_parameters():
                p.requires_grad_(True)
        elif phase == MAIN_NO_ALIGN:
            self.model.projectors.requires_grad_(False)
            for p in self.model.projectors.parameters():
                p.grad = None
        fwd: torch.nn.Module = self.model
        self.ddp_module = None
        if self.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            fwd = self.ddp_module = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.compile:
            fwd = torch.compile(fwd)  # type: ignore[assignment]
        self.fwd, self.phase = fwd, phase


@dataclass
class StepResult:
    """Scalars of one step, on the device (reading them is a host sync): the total loss, the
    method's named terms, the mean cosine per teacher (empty without alignment), the grad norm."""

    loss: Tensor
    terms: dict[str, Tensor]
    cos: list[Tensor]
    grad_norm: Tensor


def build_trainer(
    model_config: SiTConfig,
    device: torch.device,
    *,
    optim: OptimConfig | None = None,
    transport: TransportConfig | None = None,
    method: Method | None = None,
    phases: Phases | None = None,
    precision: str = "auto",
    compile: bool = False,
    seed: int = 0,
    ddp: bool = False,
    grad_accum: int = 1,
) -> Trainer:
    """Student (built by ``method``, REPA by default), EMA, AdamW and transport for
    ``model_config`` on ``device``.

    Initial weights come from ``torch.manual_seed(seed)``, so every rank starts identical. The
    transport's null class is set to the model's ``num_classes`` (the row after the real classes).
    With ``ddp`` the forward pass goes through ``DistributedDataParallel`` (the process group must
    be initialised); with ``compile`` through ``torch.compile``. With ``grad_accum`` K each step
    runs K forward/backward passes over K slices of the batch and one optimiser step. The trainer starts in the phase of
    step 0; call :meth:`Trainer.enter` with the step a resumed run continues from.
    """
    optim = optim if optim is not None else OptimConfig()
    method = method if method is not None else make_method("repa")
    torch.manual_seed(seed)
    model = method.build_student(model_config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                            fused=device.type == "cuda")
    tcfg = dataclasses.replace(transport if transport is not None else TransportConfig(), null_class=model_config.num_classes)
    tr = Trainer(model, model, ema, opt, Transport(tcfg), optim, method, phases if phases is not None else Phases(),
                 device, precision, ddp, compile, grad_accum)
    tr.enter(0)
    return tr


def micro_batches(n: int, k: int) -> list[slice]:
    """``k`` contiguous row slices covering ``range(n)``, sizes differing by at most one."""
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} samples into {k} micro-batches")
    bounds = [n * i // k for i in range(k + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def train_step(tr: Trainer, batch: StepBatch, step: int) -> StepResult:
    """One optimiser step at global step ``step`` on a batch on the device. Randomness (times,
    noise, label dropout) comes from torch's global RNG, which the caller seeds per step; it is
    drawn for the whole batch first, so K micro-steps see the draws of one step of the full batch.

    With ``tr.grad_accum`` K > 1 the batch is cut into K micro-batches; each runs forward and
    backward with its loss weighted by its share of the batch (so the gradient is the full batch's
    mean, up to rounding), and under DDP only the last one all-reduces the gradients."""
    tr.enter(step)
    coeff = tr.phases.coeff(step, tr.method.proj_coeff)
    draws = tr.method.draw(tr.transport, batch, tr.phase)
    n = batch.x.shape[0]
    tr.opt.zero_grad(set_to_none=True)
    loss: Tensor | None = None
    terms: dict[str, Tensor] = {}
    cos: list[Tensor] = []
    parts = micro_batches(n, tr.grad_accum)
    for k, rows in enumerate(parts):
        w = (rows.stop - rows.start) / n
        last = k == len(parts) - 1
        sync = contextlib.nullcontext() if last or tr.ddp_module is None else tr.ddp_module.no_sync()
        with sync:
            with autocast(tr.device, tr.precision):
                out = tr.method.losses(tr.fwd, tr.transport, batch.slice(rows), coeff, tr.phase, draws.slice(rows))
            (out.total * w).backward()
        loss = _weighted(loss, out.total.detach(), w)
        terms = {name: _weighted(terms.get(name), v.detach(), w) for name, v in out.terms.items()}
        cos = [_weighted(cos[j] if cos else None, c, w) for j, c in enumerate(out.cos)]
    assert loss is not None
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.optim.grad_clip or math.inf)  # 0: the norm only
    tr.opt.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(tr.ema.parameters()), list(tr.model.parameters()), 1.0 - tr.optim.ema_decay_at(step))
    return StepResult(loss, terms, cos, grad_norm)


def _weighted(acc: Tensor | None, value: Tensor, w: float) -> Tensor:
    """``acc + w * value`` (``w * value`` to start); with one micro-batch (w = 1) the value itself."""
    return value if w == 1.0 else (w * value if acc is None else acc + w * value)
