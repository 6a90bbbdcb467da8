"""``repa train``: the cache-backed REPA training loop (single process or torchrun/DDP).

Per step: a batch of cached (posterior, teacher tokens, label) from :mod:`train.data`, a fresh
latent sample and scale on the device, and the training method's objective
(:mod:`train.methods`; for REPA ``loss = denoise + proj_coeff * repa``) with the alignment
coefficient of the run's schedule (:mod:`train.schedule`). No teacher forward, no image decoding.
The loop knows no method by name: the method says what it reads, what it trains and what it logs.

Exact resume: all randomness of step ``s`` on rank ``r`` comes from a generator seeded with
``(seed, r, s)`` and the data order is a function of ``(seed, s)``, so a checkpoint needs only the
step besides model, EMA and optimiser state.

The step itself never waits for the device: a non-finite loss is recorded on the device
(:class:`_FirstNonFinite`) and read on the host only at log steps, before every checkpoint and at
the end of the run; metrics are summed on the device and read at log steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from repa_cache.cache.errors import CacheError, RepaError, UsageError
from repa_cache.cache.format import LATENTS, TEACHER_PREFIX, LatentNorm, sha256_json, teacher_group
from repa_cache.cache.progress import Progress
from repa_cache.cache.wds import open_meta_any, open_reader
from repa_cache.stages.devices import check_precision, resolve_device, use_bf16
from repa_cache.train.alignment import alignment_metrics
from repa_cache.train.checkpoint import (
    Checkpoint,
    ModelCard,
    latest_checkpoint,
    load_checkpoint,
    load_latest_training,
    resolve_checkpoint,
    save_checkpoint,
    strip_wrapper_prefixes,
)
from repa_cache.train.config import TrainConfig
from repa_cache.train.data import CacheBatches, DataConfig, make_loader, to_device
from repa_cache.train.loss import resample_tokens
from repa_cache.train.methods import Method, make_method
from repa_cache.train.methods.base import CacheContext
from repa_cache.train.model import SiTConfig, count_parameters, sit_config
from repa_cache.train.schedule import MAIN_NO_ALIGN, AlignSchedule, Phases
from repa_cache.train.step import Trainer, build_trainer, train_step
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


def loader_workers(asked: int | None, device: torch.device, local_world_size: int | None) -> int:
    """DataLoader workers per rank. On a GPU the reader is latency-bound (each worker waits on
    many small chunk reads), so more workers than cores still help: 8 workers delivered about 3x
    what 2 did on a 2-core machine (docs/benchmarks.md). The default there is 8, fewer where this
    rank's share of the node's cores is small; on the CPU the trainer needs the cores itself: 2."""
    if asked is not None:
        return asked
    if device.type != "cuda":
        return 2
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(2, min(8, cores // max(1, local_world_size or 1) - 1))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of all randomness of one step on one rank."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


@dataclass
class RunSetup:
    """What the loop needs, derived from the config and the cache."""

    cfg: TrainConfig
    teachers: tuple[str, ...]
    model_config: SiTConfig
    norm: LatentNorm
    teacher_tokens: dict[str, int]
    cache_info: dict[str, Any]
    card: ModelCard  # what every checkpoint of the run carries for inference
    method: Method
    phases: Phases

    def data_fields(self) -> tuple[tuple[int, tuple[str, ...]], ...]:
        """(first step, teacher arrays read) for each phase of the run (see DataConfig)."""
        return tuple((first, self.method.teacher_fields(phase != MAIN_NO_ALIGN)) for first, phase in self.phases.boundaries())


def plan_run(cfg: TrainConfig) -> RunSetup:
    """Check the config against the cache and resolve the model config and the method (its
    options with their defaults, ``cfg.proj_coeff`` included); raises user-facing errors."""
    root, meta, present = open_meta_any(cfg.cache)  # a zarr cache or its webdataset export
    cached_teachers = [g[len(TEACHER_PREFIX):] for g in present if g.startswith(TEACHER_PREFIX)]
    teachers = cfg.teachers
    if not teachers:
        if len(cached_teachers) != 1:
            have = ", ".join(cached_teachers) or "none"
            raise UsageError(f"the cache has teachers: {have}; choose with --teacher")
        teachers = tuple(cached_teachers)
    for t in teachers:
        if t not in cached_teachers:
            raise UsageError(f"teacher '{t}' is not in the cache {root} (teachers present: {', '.join(cached_teachers) or 'none'})")
    if cfg.batch_size <= 0 or cfg.max_steps < 0 or cfg.ckpt_every <= 0 or cfg.log_every <= 0:
        raise UsageError("--batch-size, --ckpt-every and --log-every must be positive, --max-steps not negative")
    negative = [f"--{k.replace('_', '-')} {v}" for k, v in (("workers", cfg.num_workers), ("holdout", cfg.holdout),
                ("align-every", cfg.align_every), ("proj-coeff", cfg.proj_coeff), ("sample-every", cfg.sample_every),
                ("warmup-steps", cfg.warmup_steps)) if v is not None and v < 0]
    if negative:
        raise UsageError(f"{', '.join(negative)}: must not be negative")
    options = dict(cfg.method_options)
    if cfg.proj_coeff is not None:
        options["proj_coeff"] = cfg.proj_coeff
    method = make_method(cfg.method, options)
    cfg = dataclasses.replace(cfg, proj_coeff=method.proj_coeff,
                              method_options={k: v for k, v in method.card()["options"].items() if k != "proj_coeff"})
    phases = Phases(AlignSchedule.parse(cfg.align_schedule), cfg.warmup_steps)
    check_precision(cfg.precision)
    reader = open_reader(root, groups=[LATENTS] + [teacher_group(t) for t in teachers])  # refuses uncommitted/damaged
    method.check_cache({t: reader.array_names(teacher_group(t)) for t in teachers})
    method.bind(CacheContext(teachers, {t: dict(reader.group(teacher_group(t)).meta.model) for t in teachers},
                             {t: str(reader.group(teacher_group(t)).commit.get("weights_sha256")) for t in teachers},
                             int(meta.resolution)))
    latents = reader.group(LATENTS)
    lat = latents.meta.model
    dims = tuple(int(reader.group(t).meta.model["dim"]) for t in teachers)
    overrides: dict[str, Any] = {
        "input_size": int(lat["latent_size"]),
        "in_channels": int(lat["latent_channels"]),
        "num_classes": len(meta.class_names),
        "z_dims": dims,
    }
    if cfg.encoder_depth is not None:
        overrides["encoder_depth"] = cfg.encoder_depth
    mcfg = sit_config(cfg.model, **overrides)
    method.check_student(mcfg)  # the shape this method can train, before anything is built
    tokens = {t: int(reader.group(t).meta.model["num_tokens"]) for t in teachers}
    for t, n in tokens.items():
        if n != mcfg.num_tokens and not cfg.resample_teacher:
            raise UsageError(
                f"teacher '{t}' has {n} tokens but {cfg.model} on {lat['latent_size']}x{lat['latent_size']} latents has "
                f"{mcfg.num_tokens}; pick a matching patch size or pass --resample-teacher"
            )
    cache_info = {
        "base_fingerprint": sha256_json(meta.base_fingerprint),
        "groups": {g: info.commit["fingerprint_hash"] for g, info in reader.groups.items()},
        "weights": {g: info.commit["weights_sha256"] for g, info in reader.groups.items()},
    }
    norm = LatentNorm.of_latents(lat)
    norm.check_channels(mcfg.in_channels)
    card = ModelCard(
        model=dataclasses.asdict(mcfg),
        teachers=teachers,
        latent_norm=norm.to_json(),
        vae={"id": lat.get("id"), "revision": lat.get("revision"), "tiny": bool(lat.get("tiny")),
             "weights_sha256": latents.commit.get("weights_sha256")},
        class_names=tuple(meta.class_names),
        method=method.card(),
        path=cfg.transport.path,
        train=cfg.to_json(),
        cache=cache_info,
    )
    return RunSetup(cfg, teachers, mcfg, norm, tokens, cache_info, card, method, phases)


def init_weights(tr: Trainer, source: str, setup: RunSetup) -> None:
    """Start a new run from the weights of another checkpoint (fine-tuning, or a run imported from
    REPA's code; a run folder gives its newest full checkpoint): its model weights (its EMA weights
    when it holds only those) become the student's,
    its EMA weights the EMA's; the optimiser, the step and the data order start fresh. The student
    must have the same shape and method."""
    src = Path(source)
    full = latest_checkpoint(src) if src.is_dir() else None  # a run folder: its newest full checkpoint
    ckpt = load_checkpoint(full if full is not None else resolve_checkpoint(src))
    try:
        theirs = dataclasses.asdict(SiTConfig(**ckpt.card.model))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--init-from {ckpt.path} has an unusable model config ({str(e).splitlines()[0]})") from None
    mine = dataclasses.asdict(setup.model_config)
    diff = [f"{k} {theirs[k]} vs {v}" for k, v in mine.items() if theirs[k] != v]
    if diff:
        raise UsageError(f"--init-from {ckpt.path} has another model than this run ({'; '.join(diff)})")
    if ckpt.card.method.get("name") != setup.method.name:
        raise UsageError(f"--init-from {ckpt.path} was trained with --method {ckpt.card.method.get('name')}, this run uses "
                         f"{setup.method.name}")
    try:
        tr.model.load_state_dict(strip_wrapper_prefixes(ckpt.model if ckpt.model is not None else ckpt.ema))
        tr.ema.load_state_dict(strip_wrapper_prefixes(ckpt.ema))
    except RuntimeError as e:
        raise UsageError(f"--init-from {ckpt.path}: the weights do not fit ({str(e).splitlines()[0]})") from None
    print(f"starting from the weights of {ckpt.path} (step {ckpt.step})", file=sys.stderr)


def with_defaults(recorded: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` with each field it lacks (also inside a part such as ``optim``) taken from ``defaults``."""
    out = dict(defaults)
    for k, v in recorded.items():
        out[k] = with_defaults(v, defaults[k]) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return out


def check_resume(ckpt: Checkpoint, cfg: TrainConfig, setup: RunSetup) -> None:
    """Refuse to resume ``ckpt`` under another cache or with a config change that alters the run."""
    path = ckpt.path
    if ckpt.card.cache != setup.cache_info:
        raise CacheError(f"checkpoint {path} was trained on another cache (fingerprints differ); use a new --out")
    new = cfg.to_json()
    old = with_defaults(ckpt.card.train, TrainConfig(cache="", out="").to_json())  # a field a run did not record had its default then
    changed = [k for k in new if k not in TrainConfig.RESUMABLE_CHANGES and old[k] != new[k]]
    if changed:
        details = "; ".join(f"{k}: {old.get(k)} -> {new[k]}" for k in changed)
        raise UsageError(f"cannot resume {path}: the config changed ({details}); use a new --out")


@dataclass
class TrainResult:
    run: Path
    step: int
    last_metrics: dict[str, float]
    resumed_from: int | None


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) a run; returns where it stopped."""
    setup = plan_run(cfg)
    cfg = setup.cfg  # with the method's options resolved
    device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    di = init_distributed(device)
    if cfg.batch_size % di.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the world size {di.world_size}")
    local = cfg.batch_size // di.world_size
    if not 1 <= cfg.grad_accum <= local:
        raise UsageError(f"--grad-accum {cfg.grad_accum} must be between 1 and the batch per rank ({local})")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    run = Path(cfg.out)
    if run.exists() and not run.is_dir():
        raise UsageError(f"--out {run} is an existing file, not a run folder")
    tr = build_trainer(setup.model_config, device, optim=cfg.optim, transport=cfg.transport, method=setup.method,
                       phases=setup.phases, precision=cfg.precision, compile=cfg.compile, seed=cfg.seed, ddp=di.world_size > 1,
                       grad_accum=cfg.grad_accum)
    start, resumed = 0, None
    ckpt = load_latest_training(run)
    if ckpt is not None:
        check_resume(ckpt, cfg, setup)  # before anything in the run folder changes
        assert ckpt.model is not None and ckpt.optimizer is not None
        tr.model.load_state_dict(ckpt.model)
        tr.ema.load_state_dict(ckpt.ema)
        tr.opt.load_state_dict(ckpt.optimizer)
        start = resumed = ckpt.step
    elif cfg.init_from:
        init_weights(tr, cfg.init_from, setup)
    if di.is_main:
        run.mkdir(parents=True, exist_ok=True)
        config = {"card": setup.card.to_json(), "teacher_tokens": setup.teacher_tokens}
        (run / "config.json").write_text(json.dumps(config, indent=1, default=str))
        n = count_parameters(tr.model)
        log.info("model %s: %.1fM backbone parameters; method %s; teachers %s; world size %d", cfg.model, n / 1e6,
                 setup.method.name, ", ".join(setup.teachers), di.world_size)
        if ckpt is not None:
            print(f"resuming {run} from step {resumed} ({ckpt.path.name})", file=sys.stderr)

    ds = CacheBatches(
        DataConfig(cfg.cache, setup.teachers, cfg.batch_size, cfg.seed, holdout=cfg.holdout, verify_checksums=cfg.verify,
                   num_workers=loader_workers(cfg.num_workers, device, di.local_world_size), teacher_fields=setup.data_fields()),
        di.rank,
        di.world_size,
    )
    loader = make_loader(ds, start, cfg.max_steps, pin_memory=device.type == "cuda")
    if di.is_main and not cfg.quiet:
        accum = f", {cfg.grad_accum} micro-steps per step" if cfg.grad_accum > 1 else ""
        print(f"{di.describe(ds.local_batch, device)}{accum}, {ds.cfg.num_workers} loader workers per rank", file=sys.stderr)
    metrics_file = run / "metrics.jsonl"
    trackers = Trackers(run, {"card": setup.card.to_json()}, cfg.tensorboard, cfg.wandb) if di.is_main else None
    grid = None
    if cfg.sample_every and di.is_main:
        from repa_cache.eval.sample import TrainingGrid  # sampling and decoding: only when grids are asked for

        grid = TrainingGrid(setup.card, setup.method, setup.model_config, cfg.seed, device,
                            "bf16" if use_bf16(cfg.precision, device) else "fp32")
    bar = Progress(cfg.max_steps, "train", "step", quiet=cfg.quiet or not di.is_main, initial=start)

    step = start
    last: dict[str, float] = {}
    acc = _Accumulator()
    non_finite = _FirstNonFinite(device)
    t_last, wait = time.perf_counter(), 0.0
    t_start = t_wait0 = time.perf_counter()
    for batch in loader:
        wait += time.perf_counter() - t_wait0
        assert int(batch["step"]) == step, "data order out of step"  # a CPU tensor: no device sync
        gen_seed = step_seed(cfg.seed, di.rank, step)
        torch.manual_seed(gen_seed)
        inputs = to_device(batch, setup.norm, setup.teachers, device, ds.codecs)
        if cfg.resample_teacher:
            inputs.patch = [resample_tokens(f, setup.model_config.grid) if f.shape[1] != setup.model_config.num_tokens else f
                            for f in inputs.patch]
        res = train_step(tr, inputs, step)
        # Recorded on the device, checked on the host at the next log or checkpoint step. The steps
        # in between still update the parameters (with NaN/inf): those updates are discarded, since
        # the check stops the run before any checkpoint is written and the last good checkpoint is
        # the resume point.
        non_finite.record(step, res.loss, res.terms)
        coeff = setup.phases.coeff(step, setup.method.proj_coeff)
        step += 1
        acc.add(loss=res.loss, **res.terms, grad_norm=res.grad_norm, **{f"cos/{t}": c for t, c in zip(setup.teachers, res.cos)})
        bar.update(1)

        is_log = step % cfg.log_every == 0 or step == cfg.max_steps
        is_ckpt = step % cfg.ckpt_every == 0 or step == cfg.max_steps
        if is_log or is_ckpt:
            non_finite.check(di, run)  # host sync (and an all-reduce under DDP); raises on divergence
        if is_log:
            last = acc.mean()  # host sync: the interval's work is done when the clock is read
            now = time.perf_counter()
            n_steps, dt = acc.count, max(now - t_last, 1e-9)
            last.update(step=step, time=now - t_start, lr=tr.opt.param_groups[0]["lr"], align_coeff=coeff, data_wait=wait / dt)
            last.update(_throughput(n_steps * ds.local_batch / dt, wait / dt, di, device))
            if device.type == "cuda":
                last["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            acc, t_last, wait = _Accumulator(), now, 0.0
            if di.is_main and cfg.align_every and step % cfg.align_every == 0:
                if not cfg.holdout:
                    log.warning("--align-every without --holdout: alignment is measured on samples the model trains on")
                last.update(alignment_metrics(tr.model, cfg.cache, setup.teachers, num=cfg.holdout or 512, resample=cfg.resample_teacher,
                                              path=cfg.transport.path, precision="bf16" if use_bf16(cfg.precision, device) else "fp32",
                                              method=setup.method))
            if di.is_main:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(last) + "\n")
                if trackers is not None:
                    trackers.log(last, step)
                if not cfg.quiet:
                    bar.write(_status(last, cfg.max_steps, setup.teachers))
        if grid is not None and step % cfg.sample_every == 0:
            _, image = grid.write(tr.ema, run, step)
            if trackers is not None:
                trackers.log_image("samples", image, step)
        if is_ckpt:
            if di.is_main:
                save_checkpoint(run, step, tr.model, tr.ema, tr.opt, setup.card, keep=cfg.keep_checkpoints)
            if di.world_size > 1:
                dist.barrier()
        t_wait0 = time.perf_counter()
    non_finite.check(di, run)
    bar.close(finished=step > start)
    if trackers is not None:
        trackers.close()
    return TrainResult(run, step, last, resumed)


class _FirstNonFinite:
    """The first step whose loss was NaN or infinite, with the loss terms of that step, kept on the
    device so that recording it never waits for the device; :meth:`check` reads it on the host."""

    NONE = 2**62  # no non-finite step yet (larger than any step, so the minimum over ranks works)

    def __init__(self, device: torch.device) -> None:
        self.step = torch.full((), self.NONE, dtype=torch.int64, device=device)  # 0-dim
        self.terms: dict[str, torch.Tensor] = {}  # name -> (value, present) at that step, (2,) each

    def record(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        first = ~torch.isfinite(loss.detach()) & (self.step == self.NONE)
        self.step = torch.where(first, step, self.step)
        for name in [*self.terms, *(k for k in terms if k not in self.terms)]:  # first-seen order
            now = torch.stack([terms[name].detach().float(), torch.ones((), device=self.step.device)]) if name in terms \
                else torch.zeros(2, device=self.step.device)
            self.terms[name] = torch.where(first, now, self.terms.get(name, torch.zeros(2, device=self.step.device)))

    def check(self, di: DistInfo, run: Path) -> None:
        """Raise :class:`TrainingDiverged` naming the first non-finite step of any rank. A host sync;
        under DDP also an all-reduce, so that every rank stops at the same check."""
        first = self.step
        if di.world_size > 1:
            first = first.clone()
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        bad = int(first.item())
        if bad == self.NONE:
            return
        if int(self.step.item()) == bad:
            values = ", ".join(f"{k} {v:.4g}" for k, (v, present) in ((k, t.tolist()) for k, t in self.terms.items()) if present)
        else:
            values = "on another rank"
        kept = latest_checkpoint(run)
        raise TrainingDiverged(
            f"loss became non-finite at step {bad} ({values}); stopped. Last good checkpoint: {kept if kept else 'none'}"
        )


def _throughput(img_per_sec: float, data_wait: float, di: DistInfo, device: torch.device) -> dict[str, float]:
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


class _Accumulator:
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


#: log keys that are not loss terms
_NOT_TERMS = {"loss", "grad_norm", "step", "time", "lr", "align_coeff", "data_wait", "world_size", "gpu_mem_gib"}


def _terms(m: dict[str, float]) -> dict[str, float]:
    """The loss terms of a log row (the method's named terms: denoise, repa, ...)."""
    return {k: v for k, v in m.items()
            if k not in _NOT_TERMS and "/" not in k and not k.startswith(("img_per_sec", "data_wait"))}


def _status(m: dict[str, float], max_steps: int, teachers: tuple[str, ...]) -> str:
    terms = " ".join(f"{k} {v:.4f}" for k, v in _terms(m).items())
    cos = " ".join(f"cos[{t}] {m[f'cos/{t}']:.3f}" for t in teachers if f"cos/{t}" in m)
    mem = f" mem {m['gpu_mem_gib']:.1f}GiB" if "gpu_mem_gib" in m else ""
    slowest = f" (slowest rank {m['img_per_sec_rank_min']:.1f})" if m["world_size"] > 1 else ""
    return (
        f"step {int(m['step'])}/{max_steps} loss {m['loss']:.4f} ({terms}) "
        f"{cos} gnorm {m['grad_norm']:.2f} {m['img_per_sec']:.1f} img/s{slowest} data-wait {m['data_wait']:.0%}{mem}"
    )


def describe_run(cfg: TrainConfig, dry_run: bool = False) -> str:
    """``repa train``: with ``dry_run`` the resolved config (from the cache) as JSON, else train and
    return a one-line summary."""
    setup = plan_run(cfg)
    if dry_run:
        resolved = {
            "train": setup.cfg.to_json(),
            "method": setup.method.card(),
            "teachers": list(setup.teachers),
            "model": dataclasses.asdict(setup.model_config),
            "latent_norm": setup.norm.to_json(),
            "teacher_tokens": setup.teacher_tokens,
            "cache": setup.cache_info,
        }
        return json.dumps(resolved, indent=1, default=str)
    res = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return ""  # under torchrun rank 0 speaks for the run
    m = res.last_metrics
    resumed = f" (resumed from step {res.resumed_from})" if res.resumed_from is not None else ""
    terms = ", ".join(f"{k} {v:.4f}" for k, v in _terms(m).items())
    loss = f"; last loss {m['loss']:.4f} ({terms})" if m else ""
    return f"run {res.run}: step {res.step}{resumed}{loss}"
