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
(:class:`train.hooks.DivergenceGuard`) and read on the host only at log steps, before every
checkpoint and at the end of the run; metrics are summed on the device and read at log steps.
Everything around the steps (the guard, the metrics log, checkpoints, the sample grid a caller
passes in) is a hook of :mod:`train.hooks` with its own cadence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from repa_cache.cache.errors import CacheError, UsageError
from repa_cache.cache.format import LATENTS, TEACHER_PREFIX, LatentNorm, LatentsRecord, TeacherRecord, teacher_group
from repa_cache.cache.identity import CacheIdentity
from repa_cache.cache.latent_stats import read_latent_stats
from repa_cache.cache.lock import writer_lock
from repa_cache.cache.open import open_meta_any, open_reader
from repa_cache.cache.storage import store_path
from repa_cache.stages.devices import check_precision, resolve_device
from repa_cache.train.checkpoint import (
    Checkpoint,
    ModelCard,
    latest_checkpoint,
    load_checkpoint,
    load_latest_training,
    resolve_checkpoint,
    strip_wrapper_prefixes,
)
from repa_cache.train.config import TrainConfig, changeable_fields
from repa_cache.train.data import CacheBatches, DataConfig, make_loader, to_device
from repa_cache.train.hooks import (
    Checkpointing,
    DivergenceGuard,
    Hook,
    HookFactory,
    MetricsLog,
    RunContext,
    StepInfo,
    alignment_probe,
    init_distributed,
    leave_distributed,
    loss_terms,
)
from repa_cache.train.loss import resample_tokens
from repa_cache.train.methods import Method, make_method
from repa_cache.train.methods.base import CacheContext
from repa_cache.train.model import SIT_SIZES, SiTConfig, count_parameters, sit_config
from repa_cache.train.schedule import MAIN_NO_ALIGN, AlignSchedule, Phases
from repa_cache.train.step import Trainer, build_trainer, train_step
from repa_cache.train.student import card_config
from repa_cache.train.tracking import Trackers

log = logging.getLogger(__name__)


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
    identity: CacheIdentity  # of the cache groups the run reads
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
    lrec = LatentsRecord.of(latents.meta)
    trecs = {t: TeacherRecord.of(reader.group(t).meta) for t in teachers}
    overrides: dict[str, Any] = {
        "input_size": lrec.latent_size,
        "in_channels": lrec.latent_channels,
        "num_classes": len(meta.class_names),
        "z_dims": tuple(trecs[t].dim for t in teachers),
    }
    if cfg.encoder_depth is not None:
        overrides["encoder_depth"] = cfg.encoder_depth
    mcfg = sit_config(cfg.model, **overrides)
    method.check_student(mcfg)  # the shape this method can train, before anything is built
    tokens = {t: trecs[t].num_tokens for t in teachers}
    for t, n in tokens.items():
        if n != mcfg.num_tokens and not cfg.resample_teacher:
            side, patch = math.isqrt(n), 0
            if side * side == n and lrec.latent_size % side == 0:
                patch = lrec.latent_size // side
            matching = f"{cfg.model.rsplit('/', 1)[0]}/{patch}"
            pick = f"--model {matching}" if patch and matching in SIT_SIZES else "a matching patch size"
            raise UsageError(
                f"teacher '{t}' has {n} tokens but {cfg.model} on {lrec.latent_size}x{lrec.latent_size} latents has "
                f"{mcfg.num_tokens}; pick {pick} or pass --resample-teacher"
            )
    identity = CacheIdentity.of(reader)
    norm = lrec.norm if cfg.latent_norm == "vae" else _dataset_norm(root, latents.commit["fingerprint_hash"], cfg)
    norm.check_channels(mcfg.in_channels)
    card = ModelCard(
        model=dataclasses.asdict(mcfg),
        teachers=teachers,
        latent_norm=norm.to_json(),
        vae={"id": lat.get("id"), "revision": lat.get("revision"), "tiny": bool(lat.get("tiny")),
             "weights_sha256": latents.commit.get("weights_sha256")} | ({"config": lat["config"]} if "config" in lat else {}),
        class_names=tuple(meta.class_names),
        method=method.card(),
        path=cfg.transport.path,
        train=cfg.to_json(),
        cache=identity.to_json(),
        sampling=method.sampling.to_json(),
    )
    return RunSetup(cfg, teachers, mcfg, norm, tokens, identity, card, method, phases)


def init_weights(tr: Trainer, source: str, setup: RunSetup) -> None:
    """Start a new run from the weights of another checkpoint (fine-tuning, or a run imported from
    REPA's code; a run folder gives its newest full checkpoint): its model weights (its EMA weights
    when it holds only those) become the student's,
    its EMA weights the EMA's; the optimiser, the step and the data order start fresh. The student
    must have the same shape and method."""
    src = Path(source)
    full = latest_checkpoint(src) if src.is_dir() else None  # a run folder: its newest full checkpoint
    ckpt = load_checkpoint(full if full is not None else resolve_checkpoint(src))
    theirs = dataclasses.asdict(card_config(ckpt.card, f"--init-from {ckpt.path}"))
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


def _dataset_norm(root: Any, fingerprint: str, cfg: TrainConfig) -> LatentNorm:
    """``--latent-norm dataset``: the cache's per-channel statistics (``repa latent-stats``)."""
    stats = read_latent_stats(root, fingerprint)
    if stats is None:
        raise UsageError(f"--latent-norm dataset: the cache {root} holds no latent statistics; compute them with "
                         f"repa latent-stats {root} (a webdataset export carries its cache's: export again after computing them)")
    if cfg.holdout:
        log.warning("the latent statistics cover all %d valid samples of the cache; this run holds the last %d of them out "
                    "of training (--holdout), so they are in the statistics but not in the training set", stats.samples,
                    cfg.holdout)
    return stats.norm


def with_defaults(recorded: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` with each field it lacks (also inside a part such as ``optim``) taken from ``defaults``."""
    out = dict(defaults)
    for k, v in recorded.items():
        out[k] = with_defaults(v, defaults[k]) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return out


def check_resume(ckpt: Checkpoint, cfg: TrainConfig, setup: RunSetup) -> None:
    """Refuse to resume ``ckpt`` under another cache or with a config change that alters the run."""
    path = ckpt.path
    if ckpt.card.trained_on != setup.identity:
        raise CacheError(f"checkpoint {path} was trained on another cache (fingerprints differ); use a new --out")
    new = cfg.to_json()
    defaults = TrainConfig(cache="", out="").to_json()  # a field a run did not record had its default then,
    if ckpt.card.train.get("method", defaults["method"]) == cfg.method:  # and so had a method option added since
        defaults["method_options"] = {k: v for k, v in make_method(cfg.method).card()["options"].items() if k != "proj_coeff"}
    old = with_defaults(ckpt.card.train, defaults)
    changed = [k for k in new if k not in changeable_fields() and old[k] != new[k]]
    if changed:
        details = "; ".join(f"{k}: {old.get(k)} -> {new[k]}" for k in changed)
        raise UsageError(f"cannot resume {path}: the config changed ({details}); use a new --out")
    if ckpt.card.latent_norm != setup.card.latent_norm:  # the same option, but the cache's statistics were computed again
        raise UsageError(f"cannot resume {path}: the cache's latent statistics changed since the run started "
                         "(repa latent-stats was run again); use a new --out")


@dataclass
class TrainResult:
    run: Path
    step: int
    last_metrics: dict[str, float]
    resumed_from: int | None


def train(cfg: TrainConfig, setup: RunSetup | None = None, hooks: Sequence[HookFactory] = ()) -> TrainResult:
    """Train (or resume) a run; returns where it stopped. ``setup``: ``plan_run(cfg)`` when the
    caller already has it; ``hooks``: more components run after each step, before checkpointing
    (``eval.grid.sample_grid`` draws the ``--sample-every`` grids)."""
    setup = setup if setup is not None else plan_run(cfg)
    cfg = setup.cfg  # with the method's options resolved
    if cfg.sample_every and not hooks:  # before the run folder is written
        raise UsageError("--sample-every needs the sample grid hook: use repa_cache.train_run (or pass eval.grid.sample_grid in hooks)")
    with run_lock(Path(cfg.out), quiet=cfg.quiet):
        return _train(cfg, setup, hooks)


@contextlib.contextmanager
def run_lock(run: Path, quiet: bool = False) -> Iterator[None]:
    """One ``repa train`` per run folder: rank 0 holds the folder's lock (:mod:`cache.lock`) while
    the run lasts, so a second run into it is refused in one line naming the first (a lock left by a
    killed run on this host is taken over; a folder made for the lock alone goes again when the run
    was refused before it started, see :func:`cache.lock.writer_lock`)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    if run.exists() and not run.is_dir():
        raise UsageError(f"--out {run} is an existing file, not a run folder")
    with writer_lock(store_path(run), "repa train", quiet=quiet):
        yield


def _train(cfg: TrainConfig, setup: RunSetup, hooks: Sequence[HookFactory]) -> TrainResult:
    """The run itself, under its folder's lock."""
    ctx, ckpt = start_run(cfg, setup)
    ds = CacheBatches(
        DataConfig(cfg.cache, setup.teachers, cfg.batch_size, cfg.seed, holdout=cfg.holdout, verify_checksums=cfg.verify,
                   num_workers=loader_workers(cfg.num_workers, ctx.device, ctx.di.local_world_size),
                   teacher_fields=setup.data_fields()),
        ctx.di.rank,
        ctx.di.world_size,
    )
    loader = make_loader(ds, ctx.start, cfg.max_steps, pin_memory=ctx.device.type == "cuda")
    if ctx.di.is_main and not cfg.quiet:
        if ckpt is not None:
            print(f"resuming {ctx.run} from step {ctx.start} ({ckpt.path.name})", file=sys.stderr)
        accum = f", {cfg.grad_accum} micro-steps per step" if cfg.grad_accum > 1 else ""
        print(f"{ctx.di.describe(ds.local_batch, ctx.device)}{accum}, {ds.cfg.num_workers} loader workers per rank", file=sys.stderr)
    t_start = time.perf_counter()
    metrics = MetricsLog(ctx, [alignment_probe(ctx)], t_start)
    extra = [h for h in (make(ctx) for make in hooks) if h is not None]
    run_hooks: list[Hook] = [DivergenceGuard(ctx), metrics, *extra, Checkpointing(ctx)]
    step, t_wait0 = ctx.start, t_start
    try:
        for batch in loader:
            wait = time.perf_counter() - t_wait0
            assert int(batch["step"]) == step, "data order out of step"  # a CPU tensor: no device sync
            torch.manual_seed(step_seed(cfg.seed, ctx.di.rank, step))
            inputs = to_device(batch, setup.norm, setup.teachers, ctx.device, ds.codecs)
            if cfg.resample_teacher:
                inputs.patch = [resample_tokens(f, setup.model_config.grid) if f.shape[1] != setup.model_config.num_tokens else f
                                for f in inputs.patch]
            info = StepInfo(step + 1, train_step(ctx.trainer, inputs, step), setup.phases.coeff(step, setup.method.proj_coeff), wait)
            step += 1
            for hook in run_hooks:
                hook.after_step(info)
            t_wait0 = time.perf_counter()
        for hook in run_hooks:
            hook.finish(step)
    finally:
        if ctx.trackers is not None:
            ctx.trackers.close()
    leave_distributed(ctx.di)
    return TrainResult(ctx.run, step, metrics.last, ckpt.step if ckpt is not None else None)


def start_run(cfg: TrainConfig, setup: RunSetup) -> tuple[RunContext, Checkpoint | None]:
    """Device, process group, trainer (with the weights of the run's newest checkpoint, or of
    ``--init-from``), the run folder's config.json and the trackers; the checkpoint resumed."""
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
    ckpt = load_latest_training(run)
    if ckpt is not None:
        check_resume(ckpt, cfg, setup)  # before anything in the run folder changes
        assert ckpt.model is not None and ckpt.optimizer is not None
        tr.model.load_state_dict(ckpt.model)
        tr.ema.load_state_dict(ckpt.ema)
        tr.opt.load_state_dict(ckpt.optimizer)
    elif cfg.init_from:
        init_weights(tr, cfg.init_from, setup)
    trackers = None
    if di.is_main:
        run.mkdir(parents=True, exist_ok=True)
        config = {"card": setup.card.to_json(), "teacher_tokens": setup.teacher_tokens}
        (run / "config.json").write_text(json.dumps(config, indent=1, default=str))
        log.info("model %s: %.1fM backbone parameters; method %s; teachers %s; world size %d", cfg.model,
                 count_parameters(tr.model) / 1e6, setup.method.name, ", ".join(setup.teachers), di.world_size)
        trackers = Trackers(run, {"card": setup.card.to_json()}, cfg.tensorboard, cfg.wandb)
    start = ckpt.step if ckpt is not None else 0
    return RunContext(cfg, setup, run, device, di, tr, start, local, trackers), ckpt


def describe_run(cfg: TrainConfig, dry_run: bool = False, hooks: Sequence[HookFactory] = ()) -> str:
    """``repa train``: with ``dry_run`` the resolved config (from the cache) as JSON, else train
    (with ``hooks``, see :func:`train`) and return a one-line summary."""
    setup = plan_run(cfg)
    if dry_run:
        resolved = {
            "train": setup.cfg.to_json(),
            "method": setup.method.card(),
            "teachers": list(setup.teachers),
            "model": dataclasses.asdict(setup.model_config),
            "latent_norm": setup.norm.to_json(),
            "teacher_tokens": setup.teacher_tokens,
            "cache": setup.identity.to_json(),
        }
        return json.dumps(resolved, indent=1, default=str)
    res = train(cfg, setup, hooks)
    if int(os.environ.get("RANK", "0")) != 0:
        return ""  # under torchrun rank 0 speaks for the run
    m = res.last_metrics
    resumed = f" (resumed from step {res.resumed_from})" if res.resumed_from is not None else ""
    terms = ", ".join(f"{k} {v:.4f}" for k, v in loss_terms(m).items())
    loss = f"; last loss {m['loss']:.4f} ({terms})" if m else ""
    return f"run {res.run}: step {res.step}{resumed}{loss}"
