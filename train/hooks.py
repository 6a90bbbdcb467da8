"""What happens around the optimiser steps of a run, each with its own cadence.

The loop in :func:`train.loop.train` runs steps; after each one it calls every hook of the run in
order. A hook owns its interval and its state: the divergence guard (every step, checked at log
and checkpoint steps), the metrics log (metrics.jsonl, trackers and the status line, with probes
such as the alignment metrics adding to a row), the sample grid (``eval.grid``, passed in by the
caller, so that training imports nothing from evaluation) and checkpointing. A hook sees the run
through :class:`RunContext` and each step through :class:`StepInfo`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from repa_cache.cache.errors import RepaError
from repa_cache.cache.progress import Progress
from repa_cache.stages.devices import use_bf16
from repa_cache.train.alignment import alignment_metrics
from repa_cache.train.checkpoint import latest_checkpoint, save_checkpoint
from repa_cache.train.config import TrainConfig
from repa_cache.train.step import StepResult, Trainer
from repa_cache.train.tracking import Trackers

log = logging.getLogger(__name__)


class TrainingDiverged(RepaError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""

    exit_code = 1


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int | None = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE); None: unknown
    backend: str = "none"  # the process group's backend; "none" for a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int | None:
        """Number of nodes, if every node runs ``local_world_size`` ranks; None when not derivable."""
        lws = self.local_world_size
        return self.world_size // lws if lws and self.world_size % lws == 0 else None

    def describe(self, local_batch: int, device: torch.device) -> str:
        """One line for the start of a run: world size, nodes, per-rank and global batch, backend."""
        nodes = self.nodes
        where = f"{nodes} node{'s' if nodes != 1 else ''}" if nodes is not None else "unknown nodes (LOCAL_WORLD_SIZE not set)"
        return (
            f"world size {self.world_size} on {where}, batch {local_batch} per rank ({local_batch * self.world_size} global), "
            f"backend {self.backend}, device {device.type}"
        )


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    lws = os.environ.get("LOCAL_WORLD_SIZE")
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
        int(lws) if lws else None, str(dist.get_backend()),
    )


def leave_distributed(di: DistInfo) -> None:
    """The end of a run under torchrun: wait for every rank, then leave the process group, so that
    no rank exits (closing its connections) while another still tears its own down; gloo aborts a
    process whose peer vanished under it. Only after a run that ended normally: a failed rank
    leaves at once and torchrun stops the others."""
    if di.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class RunContext:
    """The run as its hooks see it (built once, after the trainer and before the first step)."""

    cfg: TrainConfig
    setup: Any  # train.loop.RunSetup: model config, card, method, teachers, norm
    run: Path
    device: torch.device
    di: DistInfo
    trainer: Trainer
    start: int  # the step the run starts (or resumes) from
    local_batch: int
    trackers: Trackers | None  # the main rank's metric sinks; None elsewhere

    @property
    def precision(self) -> str:
        """The precision of evaluation passes inside the run (grids, probes)."""
        return "bf16" if use_bf16(self.cfg.precision, self.device) else "fp32"


@dataclass
class StepInfo:
    """One optimiser step as the hooks see it, after it ran."""

    step: int  # steps done, this one included
    result: StepResult
    coeff: float  # the alignment coefficient the step used
    data_wait: float  # seconds the step waited for its batch


class Hook(Protocol):
    def after_step(self, info: StepInfo) -> None:
        """Called after every optimiser step, in the order of the run's hooks."""

    def finish(self, step: int) -> None:
        """Called once when the steps end normally."""


#: Builds a hook for a run (None: not wanted, e.g. its interval is 0 or this rank does not need it).
HookFactory = Callable[[RunContext], "Hook | None"]


def due(step: int, every: int, last: int) -> bool:
    """Whether a cadence of ``every`` steps (0: never) fires after ``step``; the last step always does."""
    return every > 0 and (step % every == 0 or step == last)


class DivergenceGuard:
    """The first step whose loss was NaN or infinite, kept on the device so that recording it
    never waits for the device; read on the host (and, under DDP, all-reduced, so every rank stops
    at the same check) at log and checkpoint steps and at the end. The steps in between still
    update the parameters: those updates are discarded, since the check stops the run before any
    checkpoint is written and the last good checkpoint is the resume point."""

    NONE = 2**62  # no non-finite step yet (larger than any step, so the minimum over ranks works)

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.step = torch.full((), self.NONE, dtype=torch.int64, device=ctx.device)  # 0-dim
        self.terms: dict[str, torch.Tensor] = {}  # name -> (value, present) at that step, (2,) each

    def after_step(self, info: StepInfo) -> None:
        self.record(info.step - 1, info.result.loss, info.result.terms)
        cfg = self.ctx.cfg
        if due(info.step, cfg.log_every, cfg.max_steps) or due(info.step, cfg.ckpt_every, cfg.max_steps):
            self.check()

    def finish(self, step: int) -> None:
        self.check()

    def record(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        first = ~torch.isfinite(loss.detach()) & (self.step == self.NONE)
        self.step = torch.where(first, step, self.step)
        for name in [*self.terms, *(k for k in terms if k not in self.terms)]:  # first-seen order
            now = torch.stack([terms[name].detach().float(), torch.ones((), device=self.step.device)]) if name in terms \
                else torch.zeros(2, device=self.step.device)
            self.terms[name] = torch.where(first, now, self.terms.get(name, torch.zeros(2, device=self.step.device)))

    def check(self) -> None:
        """Raise :class:`TrainingDiverged` naming the first non-finite step of any rank."""
        first = self.step
        if self.ctx.di.world_size > 1:
            first = first.clone()
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        bad = int(first.item())
        if bad == self.NONE:
            return
        if int(self.step.item()) == bad:
            values = ", ".join(f"{k} {v:.4g}" for k, (v, present) in ((k, t.tolist()) for k, t in self.terms.items()) if present)
        else:
            values = "on another rank"
        kept = latest_checkpoint(self.ctx.run)
        raise TrainingDiverged(
            f"loss became non-finite at step {bad} ({values}); stopped. Last good checkpoint: {kept if kept else 'none'}"
        )


class Accumulator:
    """Sums of scalar tensors between log steps, synchronised with the host only when read. A
    value absent from some steps (a term of one phase only) is averaged over the steps that had it."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.count = 0

    def add(self, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    def mean(self) -> dict[str, float]:
        return {k: float(v.item()) / self.counts[k] for k, v in self.sums.items()}


#: A probe adds values to the metrics row of a log step: (its interval, the function).
Probe = tuple[int, Callable[[int], dict[str, float]]]


class MetricsLog:
    """The metrics row of each log step (loss terms, cosines, gradient norm averaged over the
    interval; throughput and data wait gathered from every rank; learning rate, alignment
    coefficient, time), plus the values of the probes due at that step; written by the main rank
    to metrics.jsonl, the trackers and the status line. Also the progress bar."""

    def __init__(self, ctx: RunContext, probes: list[Probe], t_start: float) -> None:
        self.ctx, self.probes = ctx, probes
        self.file = ctx.run / "metrics.jsonl"
        self.acc = Accumulator()
        self.last: dict[str, float] = {}
        self.t_start = self.t_last = t_start
        self.wait = 0.0
        self.bar = Progress(ctx.cfg.max_steps, "train", "step", quiet=ctx.cfg.quiet or not ctx.di.is_main, initial=ctx.start)

    def after_step(self, info: StepInfo) -> None:
        teachers = self.ctx.setup.teachers
        self.wait += info.data_wait
        r = info.result
        self.acc.add(loss=r.loss, **r.terms, grad_norm=r.grad_norm, **{f"cos/{t}": c for t, c in zip(teachers, r.cos)})
        self.bar.update(1)
        cfg, di, device = self.ctx.cfg, self.ctx.di, self.ctx.device
        if not due(info.step, cfg.log_every, cfg.max_steps):
            return
        row = self.acc.mean()  # host sync: the interval's work is done when the clock is read
        now = time.perf_counter()
        dt = max(now - self.t_last, 1e-9)
        row.update(step=info.step, time=now - self.t_start, lr=self.ctx.trainer.opt.param_groups[0]["lr"], align_coeff=info.coeff,
                   data_wait=self.wait / dt)
        row.update(throughput(self.acc.count * self.ctx.local_batch / dt, self.wait / dt, di, device))
        if device.type == "cuda":
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        self.acc, self.t_last, self.wait = Accumulator(), now, 0.0
        if di.is_main:
            for every, probe in self.probes:
                if every and info.step % every == 0:
                    row.update(probe(info.step))
            with open(self.file, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.ctx.trackers is not None:
                self.ctx.trackers.log(row, info.step)
            if not cfg.quiet:
                self.bar.write(status_line(row, cfg.max_steps, teachers))
        self.last = row

    def finish(self, step: int) -> None:
        self.bar.close(finished=step > self.ctx.start)


def alignment_probe(ctx: RunContext) -> Probe:
    """``--align-every``: CKNNA and cosine of the student to the teacher on the held-out samples."""
    cfg = ctx.cfg

    def probe(step: int) -> dict[str, float]:
        if not cfg.holdout:
            log.warning("--align-every without --holdout: alignment is measured on samples the model trains on")
        return alignment_metrics(ctx.trainer.model, cfg.cache, ctx.setup.teachers, num=cfg.holdout or 512,
                                 resample=cfg.resample_teacher, path=cfg.transport.path, precision=ctx.precision,
                                 method=ctx.setup.method)

    return cfg.align_every, probe


class Checkpointing:
    """Every ``--ckpt-every`` steps and at the last: the main rank saves model, EMA and optimiser
    (keeping ``--keep-checkpoints``), and every rank waits for it."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def after_step(self, info: StepInfo) -> None:
        cfg, di, tr = self.ctx.cfg, self.ctx.di, self.ctx.trainer
        if not due(info.step, cfg.ckpt_every, cfg.max_steps):
            return
        if di.is_main:
            save_checkpoint(self.ctx.run, info.step, tr.model, tr.ema, tr.opt, self.ctx.setup.card, keep=cfg.keep_checkpoints)
        if di.world_size > 1:
            dist.barrier()

    def finish(self, step: int) -> None:
        pass


def throughput(img_per_sec: float, data_wait: float, di: DistInfo, device: torch.device) -> dict[str, float]:
    """This rank's images/s over the log interval, gathered from every rank (one all-gather under
    DDP): the global rate (sum over ranks), the slowest and fastest rank, the largest data wait."""
    mine = torch.tensor([img_per_sec, data_wait], dtype=torch.float64, device=device)  # (2,)
    ranks = [mine]
    if di.world_size > 1:
        ranks = [torch.empty_like(mine) for _ in range(di.world_size)]
        dist.all_gather(ranks, mine)
    per_rank = torch.stack(ranks).cpu()  # (W, 2)
    rates = per_rank[:, 0]
    return {
        "img_per_sec": float(rates.sum()),
        "img_per_sec_rank_min": float(rates.min()),
        "img_per_sec_rank_max": float(rates.max()),
        "data_wait_rank_max": float(per_rank[:, 1].max()),
        "world_size": di.world_size,
    }


#: log keys that are not loss terms
_NOT_TERMS = {"loss", "grad_norm", "step", "time", "lr", "align_coeff", "data_wait", "world_size", "gpu_mem_gib"}


def loss_terms(m: dict[str, float]) -> dict[str, float]:
    """The loss terms of a log row (the method's named terms: denoise, repa, ...)."""
    return {k: v for k, v in m.items()
            if k not in _NOT_TERMS and "/" not in k and not k.startswith(("img_per_sec", "data_wait"))}


def status_line(m: dict[str, float], max_steps: int, teachers: tuple[str, ...]) -> str:
    terms = " ".join(f"{k} {v:.4f}" for k, v in loss_terms(m).items())
    cos = " ".join(f"cos[{t}] {m[f'cos/{t}']:.3f}" for t in teachers if f"cos/{t}" in m)
    mem = f" mem {m['gpu_mem_gib']:.1f}GiB" if "gpu_mem_gib" in m else ""
    slowest = f" (slowest rank {m['img_per_sec_rank_min']:.1f})" if m["world_size"] > 1 else ""
    return (
        f"step {int(m['step'])}/{max_steps} loss {m['loss']:.4f} ({terms}) "
        f"{cos} gnorm {m['grad_norm']:.2f} {m['img_per_sec']:.1f} img/s{slowest} data-wait {m['data_wait']:.0%}{mem}"
    )
