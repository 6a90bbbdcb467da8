"""One REPA training step, three input paths, same model, batch, precision and device, one process.

* ``cached``: batches streamed from a cache on disk through the real reader
  (``train.data.CacheBatches`` + ``make_loader`` + ``to_device``) — what ``repa train`` does;
* ``online``: what the public REPA code does every step — DataLoader workers read the image files
  (by default the 256x256 PNG center crops that REPA's ``dataset_tools.py`` writes once; ``--online-source raw``
  decodes and crops the original JPEG/PNG files) and decode them with PIL
  (``stages.images.decode_and_crop``), the VAE latents come precomputed (from the same cache, latents
  group only), and the teacher (DINOv2-B at 224 by default, random weights) runs forward on the
  device each step (``stages.teachers.encode_images``);
* ``synthetic``: random tensors already on the device (the upper bound: no data at all).

The step is the trainer's own (``repa_cache.train.step.train_step``, built by ``build_trainer`` with
the recipe's AdamW and EMA): per-step reseed, fresh posterior sample, bf16 autocast on CUDA (fp32 on
CPU), the method's objective (``--method``, default REPA: ``transport.training_losses``, fp32
``repa_loss``, ``loss = denoise + proj_coeff*repa``), backward, grad clip 1.0, AdamW (fused on CUDA),
EMA ``_foreach_lerp_``. ``--align-schedule stop:0`` times the steps after an alignment stop: the
cached path then reads latents only (and what the method still needs) and no projector runs.
Every step is timed with a device sync at its end, which the trainer does not have (it checks the
loss only at log steps), so a step here includes its whole device time and no overlap with the
next one; the first ``--warmup`` steps of each path are not timed.

Inputs are made offline unless ``--cache`` is given: demo images, and a cache — synthetic (random
values, real SD-VAE latent and teacher geometry, written with the cache writer API) for a registry
teacher such as ``dinov2-vit-b``, or built by the real ``precompute`` for the ``tiny`` teacher.

Examples::

    python bench/train_step.py                                   # CPU: SiT-S/2, DINOv2-B geometry, batch 4
    python bench/train_step.py --device cuda --model SiT-XL/2 --batch-size 256 --compile
    python bench/train_step.py --model SiT-tiny/2 --teacher tiny --batch-size 16 --steps 10
    python bench/train_step.py --paths cached --method reg          # or irepa; --align-schedule stop:0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (  # type: ignore[import-not-found]  # run as python bench/train_step.py
    cache_teachers,
    count_step_flops,
    env_info,
    image_keys,
    make_crops,
    make_images,
    markdown_table,
    matmul_peak_flops,
    median_spread,
    peak_memory_bytes,
    precompute_cache,
    reset_peak_memory,
    sync,
    write_synthetic_cache,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from repa_cache.stages.devices import autocast, resolve_device, use_bf16
from repa_cache.stages.images import decode_and_crop
from repa_cache.stages.teachers import encode_images, get_teacher, load_teacher
from repa_cache.train.config import TrainConfig
from repa_cache.train.data import CacheBatches, DataConfig, make_loader, to_device
from repa_cache.train.loop import plan_run, step_seed
from repa_cache.train.methods import StepBatch
from repa_cache.train.model import count_parameters
from repa_cache.train.step import Trainer, build_trainer, train_step

PATHS = ("cached", "online", "synthetic")


# --------------------------------------------------------------------------------------------
# the online (public REPA) input path


class OnlineBatches(Dataset):
    """Public REPA's loader: per batch, the precomputed VAE posterior (here: the cache's latents
    group alone) plus the image files, read and decoded with PIL in the DataLoader workers.

    Same order, same views and same batch as :class:`CacheBatches` (it wraps one with no teacher
    groups); the flipped view is the decoded crop mirrored.
    """

    def __init__(self, cfg: DataConfig, files: list[str], resolution: int) -> None:
        self.inner = CacheBatches(dataclasses.replace(cfg, teachers=()))
        self.cfg = self.inner.cfg  # make_loader reads num_workers / prefetch_factor from here
        self.files, self.resolution = files, resolution

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        batch = self.inner[step]
        crops = []
        for i, v in zip(batch["index"].tolist(), batch["view"].tolist()):
            with open(self.files[i], "rb") as f:
                res = decode_and_crop(f.read(), self.resolution)
            if res.image is None:
                raise RuntimeError(f"{self.files[i]}: {res.reason}")
            crops.append(res.image[:, ::-1] if v == 1 else res.image)  # (H, W, 3) uint8
        batch["images"] = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
        return batch


def source_files(keys: list[str], images: Path, crops: Path | None) -> list[str]:
    """File of every cache index: the crop PNG or the original image named by the manifest key;
    indices whose key is not among the images cycle over them (a synthetic or foreign cache)."""
    have = image_keys(images)
    known = set(have)

    def path(k: str) -> str:
        return str(crops / f"{k}.png") if crops is not None else str(images / k)

    return [path(k) if k in known else path(have[i % len(have)]) for i, k in enumerate(keys)]


# --------------------------------------------------------------------------------------------
# the step (mirrors train/loop.py)


def synthetic_batch(setup: Any, B: int, device: torch.device, seed: int = 1) -> StepBatch:
    """Random inputs of the run's shapes, already on the device, with what the method reads."""
    g = torch.Generator(device=device).manual_seed(seed)
    mc = setup.model_config
    x = torch.randn(B, mc.in_channels, mc.input_size, mc.input_size, device=device, generator=g)
    y = torch.randint(0, mc.num_classes, (B,), device=device, generator=g)
    fields = setup.data_fields()[0][1]
    patch = [torch.randn(B, setup.teacher_tokens[t], d, device=device, generator=g)
             for t, d in zip(setup.teachers, mc.z_dims)] if "patch" in fields else []
    cls = [torch.randn(B, d, device=device, generator=g) for d in mc.z_dims] if "cls" in fields else []
    return StepBatch(x, y, patch, cls)


def count_teacher_flops(teacher: torch.nn.Module, spec: Any, images: torch.Tensor, resolution: int, autocast: Any) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, autocast:
        encode_images(teacher, spec, images, resolution)
    return int(fc.get_total_flops())


# --------------------------------------------------------------------------------------------
# timing one path


class StageTimer:
    """Device time of a stretch of work: CUDA events on a GPU, wall time (synchronous) on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t0: Any = None

    def start(self) -> None:
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return (self.t0, e)
        return time.perf_counter() - self.t0

    @staticmethod
    def seconds(mark: Any) -> float:
        return mark[0].elapsed_time(mark[1]) / 1e3 if isinstance(mark, tuple) else mark


def run_path(path: str, args: argparse.Namespace, ctx: dict[str, Any], tr: Trainer, profile: bool = False) -> dict[str, Any]:
    device, setup = ctx["device"], ctx["setup"]
    n = args.warmup + args.steps + (1 if profile else 0)  # the profiled step comes last and is not timed
    B = args.batch_size
    teachers = setup.teachers
    loader = None
    teacher_mod = spec = None
    if path == "synthetic":
        b0 = synthetic_batch(setup, B, device)
    else:
        dcfg = DataConfig(str(ctx["cache"]), teachers, B, seed=0, block_size=args.block_size, num_workers=args.num_workers,
                          teacher_fields=setup.data_fields())
        if path == "cached":
            ds: Any = CacheBatches(dcfg)
        else:
            ds = OnlineBatches(dcfg, ctx["files"], ctx["resolution"])
            spec = get_teacher(ctx["teacher"])
            teacher_mod = load_teacher(spec, ctx["resolution"], device=device, pretrained=False)
        # As in a long run, the workers keep producing through the last timed step (the sampler
        # goes past it by the prefetch depth; those batches are never used).
        ahead = ds.cfg.prefetch_factor * args.num_workers + 1
        loader = iter(make_loader(ds, 0, n + ahead, pin_memory=device.type == "cuda"))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    timer = StageTimer(device)
    steps, waits, inputs = [], [], []
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for i in range(n):
        profiled = profile and i == n - 1  # input (and teacher forward) + train step, under torch.profiler
        prof_ctx = torch.profiler.profile(activities=acts) if profiled else contextlib.nullcontext()
        with prof_ctx as prof:
            t0 = time.perf_counter()
            torch.manual_seed(step_seed(0, 0, i))
            if path == "synthetic":
                inp = b0
                t_wait = 0.0
                timer.start()
            else:
                batch = next(loader)
                t_wait = time.perf_counter() - t0
                timer.start()
                inp = to_device(batch, setup.norm, teachers if path == "cached" else (), device, getattr(ds, "codecs", None))
                if path == "online":
                    images = batch["images"].to(device, non_blocking=True)
                    with autocast(device, tr.precision):
                        patch, cls = encode_images(teacher_mod, spec, images, ctx["resolution"])  # (B, T, D), (B, D) fp32
                    inp.patch, inp.cls = [patch], [cls]
            t_in = timer.stop()
            loss = train_step(tr, inp, 0).loss  # step 0 of the run's first phase (the schedule's stop:0 is the no-alignment phase)
            sync(device)
        if profiled:
            ctx.setdefault("profiles", {})[path] = prof
        t1 = time.perf_counter()
        if args.warmup <= i < args.warmup + args.steps:
            steps.append(t1 - t0)
            waits.append(t_wait)
            inputs.append(StageTimer.seconds(t_in))
    if not torch.isfinite(loss):  # checked once, off the clock (the trainer checks at log steps)
        raise RuntimeError(f"the {path} path's loss became non-finite")
    peak, peak_kind = peak_memory_bytes(device)
    med, spread = median_spread(steps)
    res = {
        "path": path,
        "img_per_s": B / med,
        "step_ms": 1e3 * med,
        "spread_ms": 1e3 * spread,
        "step_ms_all": [round(1e3 * s, 2) for s in steps],
        "data_wait_ms": 1e3 * median_spread(waits)[0],
        "input_ms": 1e3 * median_spread(inputs)[0],  # H2D + posterior sample (+ teacher forward online)
        "peak_mem_gib": None if peak is None else peak / 2**30,
        "peak_mem_kind": peak_kind,
    }
    if path == "online" and args.flops:
        res["teacher_gflop_per_img"] = count_teacher_flops(teacher_mod, spec, images[:2], ctx["resolution"], autocast(device, tr.precision)) / 2 / 1e9
    del loader, teacher_mod
    return res


# --------------------------------------------------------------------------------------------
# inputs


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    device = resolve_device(args.device)
    resolution = 256
    if args.cache:
        cache = Path(args.cache)
        have = cache_teachers(cache)
        teacher = args.teacher if args.teacher in have else (have[0] if len(have) == 1 else args.teacher)
    else:
        teacher = args.teacher
    images = Path(args.images) if args.images else make_images(work / "images", args.num_images)
    if not args.cache:
        cache = work / "cache"
        samples = args.samples or max(4 * args.batch_size, 64)
        if teacher.startswith("tiny"):  # the real stage one with the presets that load offline
            cache = precompute_cache(images, cache, teacher=teacher)
        else:
            cache = write_synthetic_cache(cache, samples, teacher=teacher, keys=image_keys(images), resolution=resolution)
    setup = plan_run(TrainConfig(cache=str(cache), out=str(work / "run"), model=args.model, teachers=(teacher,), batch_size=args.batch_size,
                                 method=args.method, method_options=dict(kv.split("=", 1) for kv in args.method_option),
                                 align_schedule=args.align_schedule))
    from repa_cache.cache.reader import CacheReader

    reader = CacheReader(cache, groups=["latents"])
    resolution = reader.meta.resolution
    files = None
    if "online" in args.paths:
        crops = make_crops(images, work / "crops", resolution) if args.online_source == "crops" else None
        files = source_files(reader.keys, images, crops)
    return {"device": device, "cache": cache, "teacher": teacher, "setup": setup, "resolution": resolution, "files": files,
            "num_samples": reader.num_samples}


def main() -> None:
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--model", default=None, help="SiT size (default: SiT-XL/2 on CUDA, SiT-S/2 on CPU)")
    p.add_argument("--teacher", default="dinov2-vit-b", help="registry teacher; 'tiny' builds the cache with the real precompute")
    p.add_argument("--method", default="repa", help="training method (repa train --method): repa, irepa, reg")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", help="option of the method (repeatable)")
    p.add_argument("--align-schedule", default="const", help="const, or stop:0 to time the steps after an alignment stop")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 4 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default: 20 on CUDA, 8 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per path (default: 5 on CUDA (10 with --compile), 2 on CPU)")
    p.add_argument("--paths", default=",".join(PATHS), help="comma-separated, run in this order")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 autocast on CUDA, fp32 on CPU (as the trainer)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as repa train --compile)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers for cached and online (default: 8 on CUDA, 2 on CPU)")
    p.add_argument("--block-size", type=int, default=64, help="DataConfig.block_size")
    p.add_argument("--cache", default=None, help="use this existing cache instead of making one")
    p.add_argument("--images", default=None, help="image folder whose keys the cache names (default: generated demo images)")
    p.add_argument("--num-images", type=int, default=64, help="demo images to generate (the online path cycles over them)")
    p.add_argument("--samples", type=int, default=None, help="samples in the generated cache (default: max(4*batch, 64))")
    p.add_argument("--online-source", choices=("crops", "raw"), default="crops",
                   help="crops: 256x256 PNG crops made once (public REPA's layout); raw: decode and crop the original files")
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True, help="count FLOPs and report MFU")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler on one extra (untimed) step of each path, input included; print the top ops")
    p.add_argument("--workdir", default=None, help="where generated inputs go (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.model = args.model or ("SiT-XL/2" if cuda else "SiT-S/2")
    args.batch_size = args.batch_size or (256 if cuda else 4)
    args.steps = args.steps or (20 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else ((10 if args.compile else 5) if cuda else 2)
    args.num_workers = args.num_workers if args.num_workers is not None else (8 if cuda else 2)
    args.paths = [s.strip() for s in args.paths.split(",") if s.strip()]
    bad = [s for s in args.paths if s not in PATHS]
    if bad:
        p.error(f"unknown path(s) {bad}; known: {', '.join(PATHS)}")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer
        torch.backends.cudnn.allow_tf32 = True
    bf16 = use_bf16(args.precision, device)

    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-train-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        ctx = prepare(args, tmp)
        ctx["device"] = device
        setup = ctx["setup"]
        prep_s = time.perf_counter() - t0
        tr = build_trainer(setup.model_config, device, method=setup.method, phases=setup.phases, precision=args.precision,
                           compile=args.compile)
        info: dict[str, Any] = {
            **env_info(device),
            "model": args.model,
            "method": setup.method.name,
            "align_schedule": args.align_schedule,
            "backbone_params_M": count_parameters(tr.model) / 1e6,
            "teacher": ctx["teacher"],
            "batch": args.batch_size,
            "precision": "bf16 autocast" if bf16 else "fp32",
            "compile": args.compile,
            "fused_adamw": cuda,
            "num_workers": args.num_workers,
            "warmup": args.warmup,
            "steps": args.steps,
            "cache": str(ctx["cache"]) if args.cache else f"generated ({ctx['num_samples']} samples)",
            "online_source": args.online_source,
            "prepare_s": round(prep_s, 1),
        }
        if args.flops:
            b = min(args.batch_size, 4)
            info["train_gflop_per_img"] = count_step_flops(tr, synthetic_batch(setup, b, device, seed=2)) / b / 1e9
            peak_dtype = torch.bfloat16 if bf16 else torch.float32
            info["matmul_peak_tflops"] = matmul_peak_flops(device, peak_dtype) / 1e12
            info["matmul_peak_dtype"] = str(peak_dtype).replace("torch.", "")
        results = []
        for path in args.paths:
            try:
                r = run_path(path, args, ctx, tr, profile=args.profile)
            except torch.cuda.OutOfMemoryError:
                print(f"{path}: CUDA out of memory at batch {args.batch_size}; lower --batch-size")
                results.append({"path": path, "error": f"CUDA out of memory at batch {args.batch_size}"})
                tr.opt.zero_grad(set_to_none=True)
                gc.collect()
                torch.cuda.empty_cache()
                continue
            if args.flops:
                r["achieved_tflops"] = info["train_gflop_per_img"] * r["img_per_s"] / 1e3
                if cuda:  # on a shared CPU the measured matmul peak is too noisy to divide by
                    r["mfu"] = r["achieved_tflops"] / info["matmul_peak_tflops"]
            results.append(r)
            print(f"{path}: {r['img_per_s']:.2f} img/s, step {r['step_ms']:.1f} ms (spread {r['spread_ms']:.1f})", flush=True)
        info["load_avg_at_end"] = list(os.getloadavg())
        by = {r["path"]: r for r in results if "error" not in r}
        ratios = {}
        if "cached" in by and "online" in by:
            ratios["cached_over_online"] = by["cached"]["img_per_s"] / by["online"]["img_per_s"]
        if "cached" in by and "synthetic" in by:
            ratios["cached_over_synthetic"] = by["cached"]["img_per_s"] / by["synthetic"]["img_per_s"]
        out = {"info": info, "results": results, "ratios": ratios}
        if args.profile:
            sort = "self_device_time_total" if cuda else "self_cpu_time_total"
            out["profile_top"] = {}
            for path, prof in ctx.get("profiles", {}).items():
                table = prof.key_averages().table(sort_by=sort, row_limit=15)
                out["profile_top"][path] = table
                print(f"\n### torch.profiler, one {path} step (sorted by {sort})\n{table}")
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = [dict(r, **{k: info[k] for k in ("model", "method", "align_schedule", "teacher", "batch", "precision")}) for r in results]
    for r in rows:
        r["peak_mem_gib"] = None if r.get("peak_mem_gib") is None else round(r["peak_mem_gib"], 2)
        r["mfu"] = f"{100 * r['mfu']:.1f}%" if "mfu" in r else None
        if "error" in r:
            r["img_per_s"] = r["error"]
    print(f"\n{info['device']} | torch {info['torch']} | {info['command']}")
    print(markdown_table(rows, ["model", "method", "align_schedule", "teacher", "batch", "precision", "path",
                                 "img_per_s", "step_ms", "spread_ms", "data_wait_ms",
                                "input_ms", "peak_mem_gib", "mfu"]))
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print(json.dumps({k: v for k, v in out.items() if k != "profile_top"}, indent=1, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
