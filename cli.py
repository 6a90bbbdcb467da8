"""The ``repa`` command line: thin commands that parse their arguments and call one function.

Option defaults are read from the config dataclasses and function signatures they feed
(:func:`_field`), so each default is written once, where it is used. Multi-GPU:
``torchrun --nproc-per-node N -m repa_cache.cli train ...``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from repa_cache.cache.defaults import DEFAULT_COPY_JOBS, DEFAULT_MAX_SAMPLES, DEFAULT_SHARD_BYTES
from repa_cache.cache.errors import RepaError, UsageError, quiet_unraisable, user_message
from repa_cache.cache.format import FORMAT_VERSION
from repa_cache.eval.config import AlignConfig, DemoConfig, FidConfig, SampleConfig
from repa_cache.pipeline.plan import PrecomputeConfig, check_config, recorded_settings
from repa_cache.train.config import METHOD_NAMES, OPTION_FIELDS, OptimConfig, TrainConfig, TransportConfig
from repa_cache.train.tracking import check_trackers


def _field(cls: type, name: str) -> Any:
    """The default of dataclass field ``cls.name``."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    assert f.default is not dataclasses.MISSING, f"{cls.__name__}.{name} has no default"
    return f.default


app = typer.Typer(
    name="repa",
    help="Encode a dataset once (SD-VAE latents + teacher ViT features) and train REPA models from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"repa-cache {version('repa-cache')} (cache format v{FORMAT_VERSION})")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and the cache format it writes, and exit.")] = False,
) -> None:
    """Encode a dataset once (SD-VAE latents + teacher ViT features) and train REPA models from the cache."""


@app.command(rich_help_panel="Stage one: the cache")
def precompute(
    data: Annotated[Path, typer.Argument(help="Image folder (one sub-folder per class) or folder of webdataset .tar shards.")],
    out: Annotated[str, typer.Argument(help="Cache folder or URL (s3://bucket/prefix) to create, resume, or add teachers to.")],
    resolution: Annotated[Optional[int], typer.Option(help="Crop size in pixels (ADM center crop): a multiple of 8 in [64, 4096]. "
                                                           f"Default: OUT's when it is a cache, else {_field(PrecomputeConfig, 'resolution')}.")] = None,
    vae: Annotated[
        Optional[str], typer.Option(help="AutoencoderKL: a preset (repa vaes), HF id, local diffusers folder, single-file checkpoint "
                                         "(.safetensors/.pt/.ckpt, with --vae-config), or 'tiny' / 'tiny-f16'. "
                                         "Default: the cache's VAE, else stabilityai/sd-vae-ft-ema.")
    ] = _field(PrecomputeConfig, "vae"),
    vae_revision: Annotated[Optional[str], typer.Option(help="HF revision of the VAE.")] = _field(PrecomputeConfig, "vae_revision"),
    vae_config: Annotated[Optional[str], typer.Option(help="Diffusers config a single-file --vae is read with: a bundled config "
                                                           "(va-vae-f16d32), a preset, a local diffusers folder or an HF id.")
    ] = _field(PrecomputeConfig, "vae_config"),
    teacher: Annotated[
        Optional[list[str]], typer.Option(help=f"Teacher: a registry name, or timm:MODEL_ID for any timm ViT (preprocessing from its pretrained config) (repeatable). Default: {', '.join(_field(PrecomputeConfig, 'teachers'))}.")
    ] = None,
    teacher_checkpoint: Annotated[
        Optional[list[str]], typer.Option(help="NAME=FILE: load a teacher's weights from a local file (repeatable).")
    ] = None,
    teacher_layers: Annotated[
        Optional[list[str]], typer.Option(help="[NAME=]FIRST[-LAST]: also store the hidden tokens entering teacher block FIRST "
                                               "(1-based; LAST defaults to the last block), for attention alignment "
                                               "(--method haste; DINOv2-B: 9-12). Without NAME= for every --teacher (repeatable).")
    ] = None,
    latent_norm: Annotated[str, typer.Option(help="dataset: also compute the latents' per-channel mean and std over the cache "
                                                  "(what repa train --latent-norm dataset uses; repa latent-stats adds them later). "
                                                  "vae: only the VAE config's scale.")] = _field(PrecomputeConfig, "latent_norm"),
    registers: Annotated[bool, typer.Option(help="Also store the register tokens of teachers that have them (dinov2-vit-*-reg: 4 per "
                                                 "image, final norm), as the array 'registers'.")] = _field(PrecomputeConfig, "registers"),
    flip: Annotated[Optional[bool], typer.Option(help="Also encode the horizontally flipped view. Default: OUT's when it is a cache, "
                                                     f"else {'--flip' if _field(PrecomputeConfig, 'flip') else '--no-flip'}.")] = None,
    shard_size: Annotated[Optional[int], typer.Option(help="Samples per shard (the unit of work and of writing), in [1, 65536]. "
                                                           f"Default: OUT's when it is a cache, else {_field(PrecomputeConfig, 'shard_size')}.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per encoder forward pass (at least 1).")] = _field(PrecomputeConfig, "batch_size"),
    feature_dtype: Annotated[str, typer.Option(help="Stored teacher feature dtype: float16 or float32.")] = _field(PrecomputeConfig, "feature_dtype"),
    feature_codec: Annotated[str, typer.Option(help="Teacher token codec: float16 (as --feature-dtype) or int8 (per-token scale, a quarter of float32's bytes).")] = _field(PrecomputeConfig, "feature_codec"),
    precision: Annotated[
        Optional[str], typer.Option(help="Encoder arithmetic: fp32, or bf16 (autocast, much faster on a GPU). Default: a resumed group's own, else fp32.")
    ] = _field(PrecomputeConfig, "precision"),
    device: Annotated[str, typer.Option(help="'auto' (one GPU per worker, else CPU), 'cpu', 'cuda', 'cuda:1'.")] = _field(PrecomputeConfig, "device"),
    workers: Annotated[Optional[int], typer.Option(help="Local dask worker processes (at least 1). Default: one per GPU, else 1.")] = _field(PrecomputeConfig, "workers"),
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing dask scheduler (tcp://host:8786).")] = _field(PrecomputeConfig, "scheduler"),
    seed: Annotated[Optional[int], typer.Option(help="Seed of the sample order permutation. "
                                                     f"Default: OUT's when it is a cache, else {_field(PrecomputeConfig, 'seed')}.")] = None,
    repair: Annotated[bool, typer.Option(help="First verify OUT, then encode its damaged shards again from DATA (also in committed "
                                              "groups; name the teacher of every damaged group).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Encode DATA into the cache OUT. Running it again resumes; naming a new --teacher adds it."""
    given = {"resolution": resolution, "shard_size": shard_size, "flip": flip, "seed": seed}
    settings = recorded_settings(out) | {k: v for k, v in given.items() if v is not None}
    cfg = PrecomputeConfig(
        **settings,
        data=str(data),
        out=str(out),
        vae=vae,
        vae_revision=vae_revision,
        vae_config=vae_config,
        teachers=tuple(teacher) if teacher else _field(PrecomputeConfig, "teachers"),
        teacher_checkpoints=_pairs(teacher_checkpoint or [], "--teacher-checkpoint"),
        teacher_layers={k: v for item in teacher_layers or [] for k, v in [item.split("=", 1) if "=" in item else ("*", item)]},
        registers=registers,
        latent_norm=latent_norm,
        batch_size=batch_size,
        feature_dtype=feature_dtype,
        feature_codec=feature_codec,
        precision=precision,
        device=device,
        workers=workers,
        scheduler=scheduler,
        repair=repair,
        quiet=quiet,
    )
    check_config(cfg)  # a typo is reported before torch and the models are imported
    from repa_cache.pipeline.precompute import describe_result
    from repa_cache.pipeline.precompute import precompute as run

    print(describe_result(run(cfg)))


def _with_recorded(cfg: TrainConfig, untyped: list[str], config_file: Path) -> TrainConfig:
    """A run folder that already holds a run: the ``untyped`` options (neither on the command line
    nor in --config) take the values it recorded (a changed one is then refused, or taken where it
    may change, as before)."""
    if not config_file.is_file():
        return cfg
    try:
        recorded = json.loads(config_file.read_text())["card"]["train"]
        if not isinstance(recorded, dict):
            raise TypeError("not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{config_file}: cannot read the run's recorded config ({e})") from None
    try:
        return cfg.with_recorded(recorded, untyped)
    except UsageError as e:
        raise UsageError(f"{config_file}: {e}") from None


def _has_field(values: dict[str, Any], field: str) -> bool:
    """Whether a config table holds ``field`` (``"optim.lr"``: the key ``lr`` of its ``optim`` part)."""
    head, _, tail = field.partition(".")
    return head in values and (not tail or (isinstance(values[head], dict) and tail in values[head]))


def _absolute(path: str | Path) -> str:
    """A local path made absolute (a URL as given)."""
    from repa_cache.cache.storage import is_url

    return str(path) if is_url(path) else os.path.abspath(path)


def _betas(text: str) -> tuple[float, float]:
    """``--adam-betas B1,B2``."""
    try:
        b1, b2 = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--adam-betas takes 2 comma-separated numbers, got '{text}'") from None
    return b1, b2


def _pairs(values: list[str], flag: str, form: str = "NAME=FILE") -> dict[str, str]:
    out = {}
    for v in values:
        if "=" not in v:
            raise UsageError(f"{flag} takes {form}, got '{v}'")
        k, f = v.split("=", 1)
        out[k] = f
    return out


@app.command(rich_help_panel="Stage one: the cache")
def stats(
    cache: Annotated[str, typer.Argument(help="Cache folder or URL.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write a figure (latent values per channel, token norms, outcomes, "
                                                      "class counts) to this file (.png, .pdf, .svg, ...).")] = None,
    max_samples: Annotated[int, typer.Option(help="Samples read for latent/feature statistics.")] = DEFAULT_MAX_SAMPLES,
) -> None:
    """Print what a cache holds: samples, classes, outcomes, groups, storage, latent and feature statistics."""
    from repa_cache.cache.stats import cache_stats, check_plot_path, format_stats, plot_stats

    if plot is not None:
        check_plot_path(plot)  # before the statistics are computed
    s = cache_stats(cache, max_samples=max_samples, with_histograms=plot is not None)
    if plot is not None:
        plot_stats(s, plot)
    s.pop("_histograms", None)
    print(json.dumps(s, indent=1, default=str) if json_out else format_stats(s))
    if plot is not None:  # beside the JSON, not inside it
        print(f"plot: {plot}", file=sys.stderr if json_out else sys.stdout)


@app.command("latent-stats", rich_help_panel="Stage one: the cache")
def latent_stats(
    cache: Annotated[str, typer.Argument(help="Committed cache folder or URL.")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Compute the latents' per-channel mean and std over the whole cache (every valid sample and view, float64) and store
    them in the cache, for repa train --latent-norm dataset."""
    from repa_cache.cache.latent_stats import compute_latent_stats, describe_latent_stats, write_latent_stats
    from repa_cache.cache.lock import writer_lock
    from repa_cache.cache.storage import store_path

    root = store_path(cache)
    with writer_lock(root, "repa latent-stats"):
        stats = compute_latent_stats(root, quiet=quiet)
        path = write_latent_stats(root, stats)
    print("\n".join([f"wrote {path}", *describe_latent_stats(stats)]))


@app.command(rich_help_panel="Stage one: the cache")
def verify(
    cache: Annotated[str, typer.Argument(help="Cache folder or URL.")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Check every shard's checksum, shape and completeness. Exit 0 if intact, 1 naming each damaged shard."""
    from repa_cache.cache.verify import verify_cache

    report = verify_cache(cache, quiet=quiet)
    for p in report.problems:
        print(f"DAMAGED {p}")
    if report.ok:
        print(f"ok: {report.shards_checked} shards in {len(report.groups)} groups verified ({', '.join(report.groups)})")
    else:
        print(f"{len(report.problems)} problem(s) in {report.root}")
        if any(p.shard is not None for p in report.problems):
            print(f"repair: repa precompute DATA {report.root} --repair --teacher ... encodes the damaged shards again from the source images")
        raise typer.Exit(1)


@app.command(rich_help_panel="Stage two: training")
def train(
    ctx: typer.Context,
    cache: Annotated[Optional[str], typer.Option(help="Committed cache (or its webdataset export) to train from: folder or URL.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run folder (checkpoints, metrics.jsonl, config.json). Running again resumes.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML or JSON file of the run's options, keyed as config.json's card.train "
                                                        "(a run's config.json or --dry-run's output also work); options typed on "
                                                        "the command line override it.")] = None,
    model: Annotated[str, typer.Option(help="SiT size: SiT-S/2 ... SiT-XL/2 (patch 1/2/4/8; /1 for f16 latents), SiT-tiny/2, SiT-tiny/1; U-shaped: USiT-B/2, USiT-L/2, USiT-XL/2 (--method urepa).")] = _field(TrainConfig, "model"),
    teacher: Annotated[Optional[list[str]], typer.Option(help="Teacher group(s) to align to (repeatable). Default: the cache's only teacher.")] = None,
    encoder_depth: Annotated[Optional[int], typer.Option(help="Align the output of this block (default: 4 for S/B, 8 for L/XL).")] = _field(TrainConfig, "encoder_depth"),
    method: Annotated[str, typer.Option(help=f"Training method: {', '.join(METHOD_NAMES)}. 'repa methods' lists each with its "
                                             "source, options and the cache fields it reads (docs/methods.md).")] = _field(TrainConfig, "method"),
    method_option: Annotated[Optional[list[str]], typer.Option("--method-option", "-O", help="KEY=VALUE option of the method (repeatable), "
                                                               "e.g. -O cls_coeff=0.03 for reg.")] = None,
    proj_coeff: Annotated[Optional[float], typer.Option(help="Weight of the alignment loss. Default: the method's (0.5 REPA/REG, 1.0 iREPA).")] = _field(TrainConfig, "proj_coeff"),
    align_schedule: Annotated[str, typer.Option(help="Alignment weight over the run: const, stop:N (all alignment off from step N, "
                                                     "HASTE) or exp-decay:C0,HALF_LIFE (C0*2^(-step/HALF_LIFE), ERW).")] = _field(TrainConfig, "align_schedule"),
    warmup_steps: Annotated[int, typer.Option(help="ERW encoder warm-up: the first K steps train the embedders, blocks up to "
                                                   "--encoder-depth and the projectors on clean latents with the alignment loss alone.")] = _field(TrainConfig, "warmup_steps"),
    label_dropout: Annotated[float, typer.Option(help="Probability that a label is replaced by the null class (for guidance).")] = _field(TransportConfig, "label_dropout"),
    batch_size: Annotated[int, typer.Option(help="Global batch size (over all ranks).")] = _field(TrainConfig, "batch_size"),
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation: K forward/backward passes per step on each rank, over "
                                                 "slices of its batch (same samples and draws); a resume may change K.")] = _field(TrainConfig, "grad_accum"),
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimiser steps.")] = _field(TrainConfig, "max_steps"),
    lr: Annotated[float, typer.Option(help="AdamW learning rate (constant).")] = _field(OptimConfig, "lr"),
    adam_betas: Annotated[str, typer.Option(help="AdamW betas: B1,B2.")] = ",".join(str(b) for b in _field(OptimConfig, "betas")),
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = _field(OptimConfig, "weight_decay"),
    grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm to this (0: no clipping; the norm is still logged).")] = _field(OptimConfig, "grad_clip"),
    ema_decay: Annotated[float, typer.Option(help="Decay of the EMA weights that sampling and align use, in [0, 1).")] = _field(OptimConfig, "ema_decay"),
    ema_warmup: Annotated[bool, typer.Option(help="Warm the EMA up: decay min(--ema-decay, (1+n)/(10+n)) after n steps, so a short run's "
                                                  "EMA weights are usable (REPA: off).")] = _field(OptimConfig, "ema_warmup"),
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept in the run folder (the oldest are removed; at least 1).")] = _field(TrainConfig, "keep_checkpoints"),
    seed: Annotated[int, typer.Option(help="Seed of data order, initial weights and noise.")] = _field(TrainConfig, "seed"),
    device: Annotated[str, typer.Option(help="'auto' (CUDA if present), 'cpu', 'cuda'.")] = _field(TrainConfig, "device"),
    precision: Annotated[str, typer.Option(help="'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32'.")] = _field(TrainConfig, "precision"),
    latent_norm: Annotated[str, typer.Option(help="Latent normalisation: vae (the VAE config's scale, REPA) or dataset "
                                                  "(z = (x - mean) / std per channel, from repa latent-stats).")] = _field(TrainConfig, "latent_norm"),
    compile: Annotated[bool, typer.Option(help="torch.compile the model.")] = _field(TrainConfig, "compile"),
    tf32: Annotated[bool, typer.Option(help="Allow TF32 matmuls and convolutions on CUDA (REPA's --allow-tf32).")] = _field(TrainConfig, "tf32"),
    ckpt_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).")] = _field(TrainConfig, "ckpt_every"),
    log_every: Annotated[int, typer.Option(help="Status line and metrics.jsonl every N steps.")] = _field(TrainConfig, "log_every"),
    path: Annotated[str, typer.Option(help="Interpolation path: linear or cosine.")] = _field(TransportConfig, "path"),
    time_sampling: Annotated[str, typer.Option(help="Time sampling: uniform or lognormal.")] = _field(TransportConfig, "time_sampling"),
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes per rank. Default: 2 on the CPU; on a GPU 8, fewer when a rank's share of the cores is smaller.")] = _field(TrainConfig, "num_workers"),
    resample_teacher: Annotated[bool, typer.Option(help="Resample teacher tokens to the student's grid when counts differ.")] = _field(TrainConfig, "resample_teacher"),
    tensorboard: Annotated[bool, typer.Option(help="Also write TensorBoard scalars to RUN/tb (pip install -e '.\\[track]').")] = _field(TrainConfig, "tensorboard"),
    wandb: Annotated[Optional[str], typer.Option(help="Also log to this Weights & Biases project (WANDB_MODE=offline without network).")] = _field(TrainConfig, "wandb"),
    sample_every: Annotated[int, typer.Option(help="Every N steps write a 16-image grid from the EMA weights to RUN/samples/step-N.png "
                                                   "(same noise and classes each time; Euler ODE, 50 steps, cfg 4). 0: off.")] = _field(TrainConfig, "sample_every"),
    align_every: Annotated[int, typer.Option(help="Log CKNNA/cosine to the teacher every N steps (0: off; at log steps).")] = _field(TrainConfig, "align_every"),
    holdout: Annotated[int, typer.Option(help="Hold the last N valid cache samples out of training (used by --align-every).")] = _field(TrainConfig, "holdout"),
    verify: Annotated[bool, typer.Option(help="Check each shard's checksum the first time a loader worker reads it; a mismatch stops the run "
                                              "naming the shard. --no-verify skips it (see docs/benchmarks.md for its cost).")] = _field(TrainConfig, "verify"),
    init_from: Annotated[Optional[str], typer.Option(help="Start a new run from this run folder's or checkpoint's weights (fine-tune, "
                                                          "or continue a run imported with repa import-ckpt); the optimiser and the "
                                                          "step start fresh. Ignored when --out already holds a checkpoint.")] = _field(TrainConfig, "init_from"),
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or status lines.")] = False,
) -> None:
    """Train a SiT with REPA (or another --method) from a cache: no teacher forward, no image decoding. Also under torchrun.
    Running it again resumes, with the options the run recorded as the defaults."""
    cfg = TrainConfig(
        cache=cache or "",
        out=out or "",
        model=model,
        teachers=tuple(teacher or ()),
        encoder_depth=encoder_depth,
        method=method,
        method_options=_pairs(method_option or [], "--method-option", "KEY=VALUE"),
        proj_coeff=proj_coeff,
        align_schedule=align_schedule,
        warmup_steps=warmup_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=max_steps,
        seed=seed,
        device=device,
        precision=precision,
        latent_norm=latent_norm,
        compile=compile,
        tf32=tf32,
        ckpt_every=ckpt_every,
        log_every=log_every,
        num_workers=workers,
        resample_teacher=resample_teacher,
        transport=TransportConfig(path=path, time_sampling=time_sampling, label_dropout=label_dropout),
        optim=OptimConfig(lr=lr, betas=_betas(adam_betas), weight_decay=weight_decay, grad_clip=grad_clip,
                          ema_decay=ema_decay, ema_warmup=ema_warmup),
        keep_checkpoints=keep_checkpoints,
        tensorboard=tensorboard,
        wandb=wandb,
        init_from=init_from,
        sample_every=sample_every,
        align_every=align_every,
        holdout=holdout,
        verify=verify,
        quiet=quiet,
    )
    untyped = [name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", None) == "DEFAULT"]
    if config is not None:  # the file's values for the options not typed; they count as typed from here on
        from repa_cache.train.config import read_config_file

        values = read_config_file(config)
        cfg = cfg.with_recorded(values, untyped, skip=())
        untyped = [name for name in untyped if not _has_field(values, OPTION_FIELDS.get(name, name))]
    for name in ("cache", "out"):
        if not getattr(cfg, name):
            raise UsageError(f"missing option --{name} (or '{name}' in the --config file)")
    cfg = dataclasses.replace(cfg, cache=_absolute(cfg.cache), out=_absolute(cfg.out),  # recorded absolute: align and
                              init_from=_absolute(cfg.init_from) if cfg.init_from else None)  # sample find them from any folder
    cfg = _with_recorded(cfg, untyped, Path(cfg.out) / "config.json")
    check_trackers(cfg.tensorboard, cfg.wandb)
    from repa_cache.eval.grid import sample_grid  # torch: after the checks that need none
    from repa_cache.train.loop import describe_run

    summary = describe_run(cfg, dry_run=dry_run, hooks=(sample_grid,))
    if summary:
        print(summary)


@app.command(rich_help_panel="Stage two: training")
def methods() -> None:
    """List the training methods: source, what each reads from the cache, its options (repa train -O KEY=VALUE) and the
    sampling settings repa sample uses for its checkpoints."""
    from repa_cache.train.methods import METHODS

    for name, cls in METHODS.items():
        m = cls()
        fields = ", ".join(m.teacher_fields(True))
        opts = ", ".join(f"{k}={v}" for k, v in m.card()["options"].items())
        print(f"{name}: {cls.summary}\n  source: {cls.source}\n  reads: latents, teacher {fields}\n  options: {opts}\n"
              f"  sampling: {cls.sampling.describe()} ({cls.sampling_source})")


@app.command(rich_help_panel="Stage one: the cache")
def vaes() -> None:
    """List the VAE presets for --vae: geometry, where the weights come from, who publishes them."""
    from repa_cache.stages.vae_presets import TINY_VAES, VAE_PRESETS

    for name, p in VAE_PRESETS.items():
        where = p.source + (f" ({p.subfolder}/)" if p.subfolder else "") + (f" file {p.file}, config {p.config}" if p.file else "")
        print(f"{name}: {p.geometry}; {p.origin}\n  from: {where}")
    for name, (blocks, channels) in TINY_VAES.items():
        print(f"{name}: f{2 ** (blocks - 1)}, {channels} channels; random-initialised, for tests and demos")


S, F, A = SampleConfig, FidConfig, AlignConfig  # short names for the defaults below


@app.command(rich_help_panel="Evaluation")
def sample(
    ckpt: Annotated[Path, typer.Option(help="Run folder (latest checkpoint) or a checkpoint / EMA weights file.")],
    out: Annotated[Path, typer.Option(help="Folder for images/, grid.png and samples.npz (ADM layout). Running again resumes.")],
    num: Annotated[int, typer.Option(help="Number of samples (50000 for FID).")] = _field(S, "num"),
    cfg: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (1 = off; REPA's best: 1.8 with 0,0.7). "
                                                      "Default: the method's (repa methods), as the checkpoint records it.")] = _field(S, "cfg_scale"),
    guidance_interval: Annotated[Optional[str], typer.Option(help="LOW,HIGH: apply guidance only for t in this interval. "
                                                                  "Default: the method's.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="ode or sde (Euler-Maruyama). Default: the method's.")] = _field(S, "sampler"),
    steps: Annotated[Optional[int], typer.Option(help="Integration steps. Default: the method's.")] = _field(S, "steps"),
    heun: Annotated[Optional[bool], typer.Option("--heun/--euler", help="Heun (2nd order) or Euler steps for the ODE sampler. "
                                                                         "Default: the method's.")] = _field(S, "heun"),
    class_id: Annotated[Optional[list[int]], typer.Option("--class", help="Sample only these class ids (repeatable). Default: any.")] = None,
    cls_cfg: Annotated[Optional[float], typer.Option(help="REG models: guidance scale of the jointly denoised CLS token; 0: its "
                                                         "conditional drift, as REG's sampler. Default: --cfg when given, else the "
                                                         "method's (REG: 2.3).")] = _field(S, "cls_cfg_scale"),
    bank: Annotated[Optional[str], typer.Option(help="GMem models (required): the memory bank each sample's condition is drawn from, by "
                                                     "its seed: a cache with the run's first teacher, or a .npy from repa gmem-bank.")] = _field(S, "bank"),
    seed: Annotated[int, typer.Option(help="Sample i uses seed (seed, i): results do not depend on batch size or ranks.")] = _field(S, "seed"),
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = _field(S, "batch_size"),
    vae: Annotated[Optional[str], typer.Option(help="Local folder holding the VAE the checkpoint names (same weights).")] = _field(S, "vae"),
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = _field(S, "device"),
    precision: Annotated[str, typer.Option(help="'auto' (bf16 on CUDA), 'bf16' or 'fp32'.")] = _field(S, "precision"),
    grid: Annotated[int, typer.Option(help="Samples tiled into grid.png (0: no grid).")] = _field(S, "grid"),
    weights: Annotated[str, typer.Option(help="ema (as REPA) or raw: the trained weights, for a short run whose EMA has barely moved.")] = _field(S, "weights"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = _field(S, "quiet"),
) -> None:
    """Sample images from a checkpoint's EMA (or raw) weights, decoded with the VAE it names; needs no cache. Also under torchrun."""
    from repa_cache.eval.sample import sample as run
    from repa_cache.eval.samplers import parse_guidance_interval

    job = SampleConfig(
        num=num, cfg_scale=cfg, guidance_interval=None if guidance_interval is None else parse_guidance_interval(guidance_interval),
        sampler=sampler, steps=steps,
        heun=heun, classes=tuple(class_id or ()), seed=seed, cls_cfg_scale=cls_cfg, bank=bank, batch_size=batch_size, vae=vae, device=device,
        precision=precision, grid=grid, weights=weights, quiet=quiet,
    )
    print(run(ckpt, out, job).describe())


@app.command("gmem-bank", rich_help_panel="Stage two: training")
def gmem_bank(
    cache: Annotated[str, typer.Argument(help="Committed cache (folder or URL) holding the teacher's CLS tokens.")],
    out: Annotated[Path, typer.Argument(help="The .npy to write: float32 (entries, dim), entry = valid sample x view.")],
    teacher: Annotated[Optional[str], typer.Option(help="Teacher whose CLS tokens make the bank. Default: the cache's only one.")] = None,
) -> None:
    """Write a GMem memory bank: the L2-normalised CLS tokens of every sample and view of a cache (for repa sample --bank)."""
    from repa_cache.train.methods.gmem import export_bank

    path, entries, dim = export_bank(cache, out, teacher)
    print(f"wrote {path}: {entries} entries of dimension {dim}")


@app.command("evaluate", rich_help_panel="Evaluation")
@app.command("fid", hidden=True)  # the same command under its earlier name
def fid(
    samples: Annotated[Path, typer.Argument(help="Samples: an .npz (arr_0, uint8 NHWC) or a folder of images.")],
    ref: Annotated[Path, typer.Argument(help="Reference: the ADM reference batch .npz, another .npz or an image folder.")],
    sfid: Annotated[bool, typer.Option(help="sFID: the Frechet distance on Inception's spatial mixed_6/conv features (ADM's evaluator).")] = _field(F, "sfid"),
    fd_dinov2: Annotated[bool, typer.Option(help="Also compute the Frechet distance on DINOv2 features.")] = _field(F, "fd_dinov2"),
    inception_score: Annotated[bool, typer.Option(help="Inception Score of the samples.")] = _field(F, "inception_score"),
    precision_recall: Annotated[bool, typer.Option(help="Precision and recall (k-NN balls) against the reference images.")] = _field(F, "precision_recall"),
    kid: Annotated[bool, typer.Option(help="Kernel Inception Distance against the reference images.")] = _field(F, "kid"),
    is_splits: Annotated[int, typer.Option(help="IS: splits of the samples.")] = _field(F, "is_splits"),
    pr_k: Annotated[int, typer.Option(help="Precision/recall: k of the k-NN radius.")] = _field(F, "pr_k"),
    kid_subsets: Annotated[int, typer.Option(help="KID: random subsets averaged.")] = _field(F, "kid_subsets"),
    kid_subset_size: Annotated[int, typer.Option(help="KID: images per subset (lowered to the smaller set).")] = _field(F, "kid_subset_size"),
    max_ref_images: Annotated[int, typer.Option(help="Precision/recall and KID use the first N reference images.")] = _field(F, "max_ref_images"),
    seed: Annotated[int, typer.Option(help="Seed of the IS shuffle and the KID subsets.")] = _field(F, "seed"),
    inception_weights: Annotated[Optional[str], typer.Option(help="Local Inception weights file.")] = _field(F, "inception_weights"),
    dinov2_checkpoint: Annotated[Optional[str], typer.Option(help="Local DINOv2 weights file for --fd-dinov2.")] = _field(F, "dinov2_checkpoint"),
    batch_size: Annotated[int, typer.Option(help="Images per feature-extractor batch.")] = _field(F, "batch_size"),
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = _field(F, "device"),
    stats_dir: Annotated[Optional[str], typer.Option(help="Cache of reference statistics and features (~/.cache/repa-cache/fid-stats).")] = _field(F, "stats_dir"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = _field(F, "quiet"),
) -> None:
    """FID, sFID, IS, precision/recall, KID and FD-DINOv2 of SAMPLES against REF, each with its definition; reference statistics and features are cached. `repa fid` is the same command."""
    from repa_cache.eval.fid import fid as run

    job = FidConfig(sfid=sfid, fd_dinov2=fd_dinov2, inception_score=inception_score, precision_recall=precision_recall, kid=kid,
                    is_splits=is_splits, pr_k=pr_k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                    max_ref_images=max_ref_images, seed=seed, inception_weights=inception_weights,
                    dinov2_checkpoint=dinov2_checkpoint, batch_size=batch_size, device=device, stats_dir=stats_dir, quiet=quiet)
    result = run(samples, ref, job)
    print(json.dumps(result, indent=1, default=str))  # every number computed, also when a later metric failed
    for metric, message in result.get("failed", {}).items():
        print(f"error: {metric}: {message}", file=sys.stderr)
    if result.get("failed"):
        raise typer.Exit(1)


@app.command(rich_help_panel="Evaluation")
def align(
    ckpt: Annotated[Path, typer.Option(help="Run folder or checkpoint file.")],
    cache: Annotated[Optional[str], typer.Option(help="Cache with the teacher features. Default: the training cache it names.")] = _field(A, "cache"),
    num: Annotated[int, typer.Option(help="Samples from the end of the cache's valid indices.")] = _field(A, "num"),
    t: Annotated[float, typer.Option(help="Noise level at which the student is probed.")] = _field(A, "t"),
    k: Annotated[int, typer.Option(help="Neighbours for CKNNA and mutual kNN.")] = _field(A, "k"),
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = _field(A, "batch_size"),
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = _field(A, "device"),
    precision: Annotated[str, typer.Option(help="'auto' (bf16 on CUDA), 'bf16' or 'fp32'.")] = _field(A, "precision"),
    weights: Annotated[str, typer.Option(help="ema (as REPA) or raw: the trained weights, for a short run whose EMA has barely moved.")] = _field(A, "weights"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Alignment of a checkpoint to its teacher(s) on cached features: mean cosine and CKNNA."""
    from repa_cache.eval.align import align as run

    job = AlignConfig(cache=cache, num=num, t=t, k=k, batch_size=batch_size, device=device, precision=precision, weights=weights)
    print(json.dumps(run(ckpt, job, quiet=quiet), indent=1, default=str))


@app.command("import-ckpt", rich_help_panel="Stage two: training")
def import_ckpt(
    src: Annotated[Path, typer.Argument(help="Checkpoint of the public REPA code (train.py's NNNNNNN.pt or a released one).")],
    out: Annotated[Path, typer.Argument(help="New (or empty) run folder to write.")],
    teacher: Annotated[Optional[list[str]], typer.Option(help="Teacher of each projector, in order (repeatable). Default: unknown.")] = None,
    vae: Annotated[Optional[str], typer.Option(help="VAE recorded in the model card (HF id, local folder or 'tiny'). Default: stabilityai/sd-vae-ft-ema.")] = None,
    encoder_depth: Annotated[Optional[int], typer.Option(help="Block the projectors read. Default: the checkpoint's args, else the size's default.")] = None,
    num_heads: Annotated[Optional[int], typer.Option(help="Attention heads. Default: from the model size.")] = None,
    path: Annotated[Optional[str], typer.Option(help="Interpolant: linear or cosine. Default: the checkpoint's args, else linear.")] = None,
    latent_norm: Annotated[str, typer.Option(help="repa: SD-VAE's scale 0.18215 (REPA's runs); vae: what the --vae config asks for "
                                                  "(REPA-E's SiT/1 releases on E2E-VAEs).")] = "repa",
) -> None:
    """Turn a REPA checkpoint into a run folder that repa sample and repa align read."""
    from repa_cache.train.interop import ImportOptions, describe_import, import_repa_checkpoint

    given: dict[str, Any] = dict(teachers=tuple(teacher) if teacher else None, vae=vae, encoder_depth=encoder_depth, num_heads=num_heads,
                                 path=path, latent_norm=latent_norm)
    opts = ImportOptions(**{k: v for k, v in given.items() if v is not None})  # unset: the dataclass default
    print(describe_import(import_repa_checkpoint(src, out, opts)))


@app.command("export-ckpt", rich_help_panel="Stage two: training")
def export_ckpt(
    ckpt: Annotated[Path, typer.Argument(help="Run folder (newest full checkpoint, else newest weights) or checkpoint file.")],
    dst: Annotated[Path, typer.Argument(help="New .pt file in REPA's layout (model, ema, opt, args, steps).")],
) -> None:
    """Write a checkpoint in the layout of the public REPA code, for its generate.py and train.py."""
    from repa_cache.train.interop import export_repa_checkpoint

    print(f"wrote {export_repa_checkpoint(ckpt, dst)}")


@app.command("export-wds", rich_help_panel="Stage one: the cache")
def export_wds(
    cache: Annotated[str, typer.Argument(help="Committed cache: folder or URL.")],
    out: Annotated[str, typer.Argument(help="Folder or URL for the tar shards and index.json (new, empty, or a previous export).")],
    shard_bytes: Annotated[int, typer.Option(help="Bytes of sample data per tar shard (a shard may exceed it by one sample).")] = DEFAULT_SHARD_BYTES,
    teacher: Annotated[Optional[list[str]], typer.Option(help="Export only these teachers (repeatable; latents always). Default: every committed group.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Export a cache as webdataset tar shards (one sample per valid index) with a self-describing index.json."""
    from repa_cache.cache.wds import describe_export
    from repa_cache.cache.wds import export_wds as run

    print(describe_export(run(cache, out, shard_bytes=shard_bytes, groups=["latents", *teacher] if teacher else None, quiet=quiet), out))


@app.command(rich_help_panel="Start here")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo images and cache.")] = Path(_field(DemoConfig, "out")),
    per_class: Annotated[int, typer.Option(help="Images per class (4 classes).")] = _field(DemoConfig, "per_class"),
    train_steps: Annotated[int, typer.Option(help="Training steps of the demo run.")] = _field(DemoConfig, "train_steps"),
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run the whole pipeline offline on a small generated image set with tiny random-init models."""
    from repa_cache.eval.demo import run_demo

    run_demo(DemoConfig(out=str(out), per_class=per_class, train_steps=train_steps, quiet=quiet))


@app.command("plot", rich_help_panel="Stage two: training")
def plot_curves(
    run: Annotated[Path, typer.Argument(help="Run folder of `repa train` (or its metrics.jsonl).")],
    out: Annotated[Optional[Path], typer.Option(help="Image to write (.png, .pdf, .svg, ...). Default: RUN/curves.png.")] = None,
) -> None:
    """Draw a run's loss, alignment, throughput and gradient-norm curves from its metrics.jsonl; prints the image's path."""
    from repa_cache.eval.plot import plot_run

    print(plot_run(run, out))


cache_app = typer.Typer(help="Move caches between local disk and object storage.", no_args_is_help=True)
app.add_typer(cache_app, name="cache", rich_help_panel="Stage one: the cache")


@cache_app.command("copy")
def cache_copy(
    src: Annotated[str, typer.Argument(help="Committed cache: folder or URL (s3://bucket/prefix).")],
    dst: Annotated[str, typer.Argument(help="Destination folder or URL: new, empty, an interrupted copy, or the same cache.")],
    teacher: Annotated[Optional[list[str]], typer.Option(help="Copy only these teachers (repeatable; latents always). Default: every committed group.")] = None,
    latents_only: Annotated[bool, typer.Option("--latents-only", help="Copy the latents alone (then precompute teachers into the copy, "
                                                                     "e.g. again with --teacher-layers).")] = False,
    jobs: Annotated[int, typer.Option(help="Shards copied concurrently.")] = DEFAULT_COPY_JOBS,
    feature_codec: Annotated[Optional[str], typer.Option(help="Store the teacher tokens in this codec (float16 or int8): decode and encode again. Default: copy as stored.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Copy a committed cache, checking every shard against its checksum; running it again finishes an interrupted copy."""
    from repa_cache.cache.copy import copy_cache, describe_copy

    if latents_only and teacher:
        raise UsageError("--latents-only copies no teacher; leave out --teacher")
    groups = [] if latents_only else teacher
    print(describe_copy(copy_cache(src, dst, groups=groups, jobs=jobs, quiet=quiet, feature_codec=feature_codec)))


def main() -> None:
    """Entry point: configure logging once, turn user-facing errors into one line and an exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # distributed sets up its loggers from dask's config when it is imported (by a command, later),
    # and worker processes inherit the variable; dask itself was imported above and read its
    # config then, so it reads it again.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    import dask.config

    dask.config.refresh()
    quiet_unraisable()
    try:
        app()  # standalone: usage errors print their message and exit 2, typer.Exit exits with its code
    except RepaError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        from repa_cache.cache.storage import describe_storage_error, is_storage_error

        if not is_storage_error(e):
            raise
        print(f"error: {describe_storage_error(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
