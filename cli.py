"""The ``repa`` command line: thin commands that parse their arguments and call one function."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cache.errors import RepaError, quiet_unraisable

app = typer.Typer(
    name="repa",
    help="Encode a dataset once (SD-VAE latents + teacher ViT features) and train REPA models from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def precompute(
    data: Annotated[Path, typer.Argument(help="Image folder (one sub-folder per class) or folder of webdataset .tar shards.")],
    out: Annotated[str, typer.Argument(help="Cache folder or URL (s3://bucket/prefix) to create, resume, or add teachers to.")],
    resolution: Annotated[int, typer.Option(help="Crop size in pixels (ADM center crop).")] = 256,
    vae: Annotated[
        Optional[str], typer.Option(help="Diffusers AutoencoderKL: HF id, local folder, or 'tiny'. Default: the cache's VAE, else stabilityai/sd-vae-ft-ema.")
    ] = None,
    vae_revision: Annotated[Optional[str], typer.Option(help="HF revision of the VAE.")] = None,
    teacher: Annotated[Optional[list[str]], typer.Option(help="Teacher name from the registry (repeatable). Default: dinov2-vit-b.")] = None,
    teacher_checkpoint: Annotated[
        Optional[list[str]], typer.Option(help="NAME=FILE: load a teacher's weights from a local file (repeatable).")
    ] = None,
    flip: Annotated[bool, typer.Option(help="Also encode the horizontally flipped view.")] = True,
    shard_size: Annotated[int, typer.Option(help="Samples per shard (the unit of work and of writing).")] = 256,
    batch_size: Annotated[int, typer.Option(help="Images per encoder forward pass.")] = 64,
    feature_dtype: Annotated[str, typer.Option(help="Stored teacher feature dtype: float16 or float32.")] = "float16",
    precision: Annotated[
        Optional[str], typer.Option(help="Encoder arithmetic: fp32, or bf16 (autocast, much faster on a GPU). Default: a resumed group's own, else fp32.")
    ] = None,
    device: Annotated[str, typer.Option(help="'auto' (one GPU per worker, else CPU), 'cpu', 'cuda', 'cuda:1'.")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Local dask worker processes. Default: one per GPU, else 1.")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="Address of an existing dask scheduler (tcp://host:8786).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample order permutation.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Encode DATA into the cache OUT. Running it again resumes; naming a new --teacher adds it."""
    from pipeline.plan import PrecomputeConfig
    from pipeline.precompute import describe_result, precompute as run

    cfg = PrecomputeConfig(
        data=str(data),
        out=str(out),
        resolution=resolution,
        vae=vae,
        vae_revision=vae_revision,
        teachers=tuple(teacher) if teacher else ("dinov2-vit-b",),
        teacher_checkpoints=_pairs(teacher_checkpoint or [], "--teacher-checkpoint"),
        flip=flip,
        shard_size=shard_size,
        batch_size=batch_size,
        feature_dtype=feature_dtype,
        precision=precision,
        device=device,
        workers=workers,
        scheduler=scheduler,
        seed=seed,
        quiet=quiet,
    )
    print(describe_result(run(cfg)))


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    from cache.errors import UsageError

    out = {}
    for v in values:
        if "=" not in v:
            raise UsageError(f"{flag} takes NAME=FILE, got '{v}'")
        k, f = v.split("=", 1)
        out[k] = f
    return out


@app.command()
def stats(
    cache: Annotated[str, typer.Argument(help="Cache folder or URL.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    plot: Annotated[Optional[Path], typer.Option(help="Write histograms to this PNG file.")] = None,
    max_samples: Annotated[int, typer.Option(help="Samples read for latent/feature statistics.")] = 10_000,
) -> None:
    """Print what a cache holds: samples, classes, outcomes, groups, storage, latent and feature statistics."""
    from cache.stats import cache_stats, format_stats, plot_stats

    s = cache_stats(cache, max_samples=max_samples, with_histograms=plot is not None)
    if plot is not None:
        plot_stats(s, plot)
    s.pop("_histograms", None)
    print(json.dumps(s, indent=1, default=str) if json_out else format_stats(s))


@app.command()
def verify(
    cache: Annotated[str, typer.Argument(help="Cache folder or URL.")],
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Check every shard's checksum, shape and completeness. Exit 0 if intact, 1 naming each damaged shard."""
    from cache.verify import verify_cache

    report = verify_cache(cache, quiet=quiet)
    for p in report.problems:
        print(f"DAMAGED {p}")
    if report.ok:
        print(f"ok: {report.shards_checked} shards in {len(report.groups)} groups verified ({', '.join(report.groups)})")
    else:
        print(f"{len(report.problems)} problem(s) in {report.root}")
        raise typer.Exit(1)


@app.command()
def train(
    cache: Annotated[str, typer.Option(help="Committed cache (or its webdataset export) to train from: folder or URL.")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints, metrics.jsonl, config.json). Running again resumes.")],
    model: Annotated[str, typer.Option(help="SiT size: SiT-S/2 ... SiT-XL/2 (patch 2/4/8), or SiT-tiny/2.")] = "SiT-B/2",
    teacher: Annotated[Optional[list[str]], typer.Option(help="Teacher group(s) to align to (repeatable). Default: the cache's only teacher.")] = None,
    encoder_depth: Annotated[Optional[int], typer.Option(help="Align the output of this block (default: 4 for S/B, 8 for L/XL).")] = None,
    proj_coeff: Annotated[float, typer.Option(help="Weight of the REPA loss.")] = 0.5,
    batch_size: Annotated[int, typer.Option(help="Global batch size (over all ranks).")] = 256,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimiser steps.")] = 400_000,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (constant).")] = 1e-4,
    seed: Annotated[int, typer.Option(help="Seed of data order, initial weights and noise.")] = 0,
    device: Annotated[str, typer.Option(help="'auto' (CUDA if present), 'cpu', 'cuda'.")] = "auto",
    precision: Annotated[str, typer.Option(help="'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32'.")] = "auto",
    compile: Annotated[bool, typer.Option(help="torch.compile the model.")] = False,
    ckpt_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).")] = 10_000,
    log_every: Annotated[int, typer.Option(help="Status line and metrics.jsonl every N steps.")] = 100,
    path: Annotated[str, typer.Option(help="Interpolation path: linear or cosine.")] = "linear",
    time_sampling: Annotated[str, typer.Option(help="Time sampling: uniform or lognormal.")] = "uniform",
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes per rank. Default: 2 on the CPU; on a GPU 8, fewer when a rank's share of the cores is smaller.")] = None,
    resample_teacher: Annotated[bool, typer.Option(help="Resample teacher tokens to the student's grid when counts differ.")] = False,
    tensorboard: Annotated[bool, typer.Option(help="Also write TensorBoard scalars to RUN/tb.")] = False,
    align_every: Annotated[int, typer.Option(help="Log CKNNA/cosine to the teacher every N steps (0: off; at log steps).")] = 0,
    holdout: Annotated[int, typer.Option(help="Hold the last N valid cache samples out of training (used by --align-every).")] = 0,
    dry_run: Annotated[bool, typer.Option(help="Print the resolved config and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or status lines.")] = False,
) -> None:
    """Train a SiT with REPA from a cache: no teacher forward, no image decoding. Also under torchrun."""
    from train.loop import OptimConfig, TrainConfig, describe_run
    from train.transport import TransportConfig

    cfg = TrainConfig(
        cache=str(cache),
        out=str(out),
        model=model,
        teachers=tuple(teacher or ()),
        encoder_depth=encoder_depth,
        proj_coeff=proj_coeff,
        batch_size=batch_size,
        max_steps=max_steps,
        seed=seed,
        device=device,
        precision=precision,
        compile=compile,
        ckpt_every=ckpt_every,
        log_every=log_every,
        num_workers=workers,
        resample_teacher=resample_teacher,
        transport=TransportConfig(path=path, time_sampling=time_sampling),
        optim=OptimConfig(lr=lr),
        tensorboard=tensorboard,
        align_every=align_every,
        holdout=holdout,
        quiet=quiet,
    )
    print(describe_run(cfg, dry_run=dry_run))


@app.command()
def sample(
    ckpt: Annotated[Path, typer.Option(help="Run folder (latest checkpoint) or a checkpoint / EMA weights file.")],
    out: Annotated[Path, typer.Option(help="Folder for images/, grid.png and samples.npz (ADM layout). Running again resumes.")],
    num: Annotated[int, typer.Option(help="Number of samples (50000 for FID).")] = 50_000,
    cfg: Annotated[float, typer.Option(help="Classifier-free guidance scale (1 = off; REPA's best: 1.8 with interval 0,0.7).")] = 1.0,
    guidance_interval: Annotated[str, typer.Option(help="LOW,HIGH: apply guidance only for t in this interval.")] = "0,0.7",
    sampler: Annotated[str, typer.Option(help="ode or sde (Euler-Maruyama).")] = "sde",
    steps: Annotated[int, typer.Option(help="Integration steps.")] = 250,
    heun: Annotated[bool, typer.Option("--heun/--euler", help="Heun (2nd order) or Euler steps for the ODE sampler.")] = False,
    class_id: Annotated[Optional[list[int]], typer.Option("--class", help="Sample only these class ids (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Sample i uses seed (seed, i): results do not depend on batch size or ranks.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 64,
    cache: Annotated[Optional[str], typer.Option(help="The training cache, if it moved since training.")] = None,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    precision: Annotated[str, typer.Option(help="'auto' (bf16 on CUDA), 'bf16' or 'fp32'.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Sample images from a checkpoint's EMA weights and decode them with the cache's VAE. Also under torchrun."""
    from eval.sample import sample as run
    from eval.samplers import parse_guidance_interval

    res = run(
        ckpt, out, num=num, cfg_scale=cfg, guidance_interval=parse_guidance_interval(guidance_interval), sampler=sampler,
        steps=steps, heun=heun, classes=tuple(class_id or ()), seed=seed, batch_size=batch_size, cache=cache,
        device=device, precision=precision, quiet=quiet,
    )
    print(res.describe())


@app.command()
def fid(
    samples: Annotated[Path, typer.Argument(help="Samples: an .npz (arr_0, uint8 NHWC) or a folder of images.")],
    ref: Annotated[Path, typer.Argument(help="Reference: the ADM reference batch .npz, another .npz or an image folder.")],
    fd_dinov2: Annotated[bool, typer.Option(help="Also compute the Frechet distance on DINOv2 features.")] = False,
    inception_weights: Annotated[Optional[Path], typer.Option(help="Local Inception weights file for torch-fidelity.")] = None,
    dinov2_checkpoint: Annotated[Optional[Path], typer.Option(help="Local DINOv2 weights file for --fd-dinov2.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per feature-extractor batch.")] = 50,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Frechet Inception Distance (torch-fidelity) between SAMPLES and REF; reference statistics are cached."""
    from eval.fid import fid as run

    res = run(
        samples, ref, fd_dinov2=fd_dinov2, inception_weights=inception_weights,
        dinov2_checkpoint=None if dinov2_checkpoint is None else str(dinov2_checkpoint),
        batch_size=batch_size, device=device, quiet=quiet,
    )
    print(json.dumps(res, indent=1, default=str))


@app.command()
def align(
    ckpt: Annotated[Path, typer.Option(help="Run folder or checkpoint file.")],
    cache: Annotated[Optional[str], typer.Option(help="Cache with the teacher features (default: the training cache).")] = None,
    num: Annotated[int, typer.Option(help="Samples from the end of the cache's valid indices.")] = 1024,
    t: Annotated[float, typer.Option(help="Noise level at which the student is probed.")] = 0.5,
    k: Annotated[int, typer.Option(help="Neighbours for CKNNA and mutual kNN.")] = 10,
    device: Annotated[str, typer.Option(help="'auto', 'cpu' or 'cuda'.")] = "auto",
) -> None:
    """Alignment of a checkpoint to its teacher(s) on cached features: mean cosine and CKNNA."""
    from eval.align import align as run

    print(json.dumps(run(ckpt, cache, num=num, t=t, k=k, device=device), indent=1, default=str))


@app.command("export-wds")
def export_wds(
    cache: Annotated[str, typer.Argument(help="Committed cache: folder or URL.")],
    out: Annotated[str, typer.Argument(help="Folder or URL for the tar shards and index.json (new, empty, or a previous export).")],
    shard_bytes: Annotated[int, typer.Option(help="Bytes of sample data per tar shard (a shard may exceed it by one sample).")] = 1_000_000_000,
    teacher: Annotated[Optional[list[str]], typer.Option(help="Export only these teachers (repeatable; latents always). Default: every committed group.")] = None,
) -> None:
    """Export a cache as webdataset tar shards (one sample per valid index) with a self-describing index.json."""
    from cache.wds import describe_export, export_wds as run

    print(describe_export(run(cache, out, shard_bytes=shard_bytes, groups=["latents", *teacher] if teacher else None), out))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo images and cache.")] = Path("demo-out"),
    per_class: Annotated[int, typer.Option(help="Images per class (4 classes).")] = 12,
    train_steps: Annotated[int, typer.Option(help="Training steps of the demo run.")] = 200,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run the whole pipeline offline on a small generated image set with tiny random-init models."""
    from pipeline.demo import run_demo

    run_demo(out, per_class=per_class, train_steps=train_steps, quiet=quiet)


cache_app = typer.Typer(help="Move caches between local disk and object storage.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("copy")
def cache_copy(
    src: Annotated[str, typer.Argument(help="Committed cache: folder or URL (s3://bucket/prefix).")],
    dst: Annotated[str, typer.Argument(help="Destination folder or URL: new, empty, an interrupted copy, or the same cache.")],
    teacher: Annotated[Optional[list[str]], typer.Option(help="Copy only these teachers (repeatable; latents always). Default: every committed group.")] = None,
    jobs: Annotated[int, typer.Option(help="Shards copied concurrently.")] = 8,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Copy a committed cache, checking every shard against its checksum; running it again finishes an interrupted copy."""
    from cache.copy import copy_cache, describe_copy

    print(describe_copy(copy_cache(src, dst, groups=teacher, jobs=jobs, quiet=quiet)))


def main() -> None:
    """Entry point: configure logging once, turn user-facing errors into one line and an exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")  # dask reads this when distributed is imported
    quiet_unraisable()
    try:
        app()  # standalone: usage errors print their message and exit 2, typer.Exit exits with its code
    except RepaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - storage failures get one line; anything else is a bug
        from cache.storage import describe_storage_error, is_storage_error

        if not is_storage_error(e):
            raise
        print(f"error: {describe_storage_error(e)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
