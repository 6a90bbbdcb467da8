"""Stage-one throughput: images/s and stored bytes per sample.

Two measurements, both on generated images (no downloads):

* ``--mode pipeline``: the real ``precompute`` (dask, decode, crop, encode, write, commit) with
  the tiny presets, end to end; bytes per sample from the finished cache.
* ``--mode models``: the full-size architectures with random weights — SD-VAE (``sd-vae-ft-ema``
  geometry: 4x32x32 latents at 256 px) and DINOv2-B/14 at 224 px — timed stage by stage on a
  batch (decode+crop, VAE encode, teacher encode, per view), with stored bytes per sample from
  compressing the outputs with the cache's codec. Random weights give the real FLOPs, but their
  features may compress differently from trained ones.

Examples::

    python bench/encode.py --mode pipeline --images 128
    python bench/encode.py --mode models --images 16 --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from repa_cache.cache.writer import DEFAULT_CODEC
from repa_cache.pipeline.demo import DEMO_CLASSES, make_demo_images


def sd_vae_random(device: torch.device, dtype: torch.dtype):
    """The SD-VAE architecture (as stabilityai/sd-vae-ft-ema) with random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=256,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
    )
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median, spread) of seconds per call after one warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (max(times) - min(times))


def _stored_bytes(arr: np.ndarray) -> int:
    """Bytes of one array compressed with the cache's codec (Blosc zstd, shuffle), per sample."""
    import numcodecs

    c = DEFAULT_CODEC
    blosc = numcodecs.Blosc(cname=c["cname"], clevel=c["clevel"], shuffle=numcodecs.Blosc.SHUFFLE)
    return sum(len(blosc.encode(np.ascontiguousarray(x))) for x in arr)


def bench_models(args: argparse.Namespace) -> dict:
    from repa_cache.stages import teachers
    from repa_cache.stages import vae as vae_mod
    from repa_cache.stages.devices import autocast
    from repa_cache.stages.images import decode_and_crop

    device = torch.device(args.device)
    # As stage one's --precision: fp32 weights, bf16 autocast (and a channels-last VAE) on CUDA.
    precision = "bf16" if (device.type == "cuda" and args.bf16) else "fp32"
    dtype = torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_images(Path(tmp), per_class=max(1, args.images // len(DEMO_CLASSES)), bad_inputs=False)
        files = sorted(p for p in root.rglob("*") if p.is_file())[: args.images]
        blobs = [p.read_bytes() for p in files]
    B = args.batch_size
    decode_s, _ = _timed(lambda: [decode_and_crop(b, args.resolution) for b in blobs[:B]], torch.device("cpu"), args.repeats)
    threads = os.cpu_count() or 1  # what a worker uses per GPU when it is alone on the machine
    with ThreadPoolExecutor(threads) as pool:
        decode_mt_s, _ = _timed(lambda: list(pool.map(lambda b: decode_and_crop(b, args.resolution), blobs)),
                                torch.device("cpu"), args.repeats)
    crops = np.stack([decode_and_crop(b, args.resolution).image for b in blobs[:B]])
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous().to(device)  # (B, 3, H, W) uint8
    vae = sd_vae_random(device, dtype)
    if precision == "bf16":
        vae = vae.to(memory_format=torch.channels_last)
    spec = teachers.get_teacher("dinov2-vit-b")
    teacher = teachers.load_teacher(spec, args.resolution, device=device, pretrained=False)

    def encode_vae():
        with autocast(device, precision):
            return vae_mod.encode_images(vae, images)

    def encode_teacher():
        with autocast(device, precision):
            return teachers.encode_images(teacher, spec, images, args.resolution)

    vae_s, vae_spread = _timed(encode_vae, device, args.repeats)
    tea_s, tea_spread = _timed(encode_teacher, device, args.repeats)
    mean, std = encode_vae()
    patch, cls = encode_teacher()
    views = 2 if args.flip else 1
    per_sample = {
        "latents": views * (_stored_bytes(mean.float().cpu().numpy()) + _stored_bytes(std.float().cpu().numpy())) / B,
        "dinov2-vit-b": views * (_stored_bytes(patch.half().cpu().numpy()) + _stored_bytes(cls.half().cpu().numpy())) / B,
    }
    model_s = views * (vae_s + tea_s)  # both views go through both models
    return {
        "mode": "models (random-init SD-VAE + DINOv2-B/14)",
        "device": _device_name(device),
        "precision": "bf16 autocast" if precision == "bf16" else "fp32",
        "batch": B,
        "views": views,
        "resolution": args.resolution,
        "decode_crop_img_per_s": round(B / decode_s, 1),
        "decode_crop_threads": threads,
        "decode_crop_img_per_s_threaded": round(len(blobs) / decode_mt_s, 1),
        "vae_img_per_s": round(B / vae_s, 2),
        "vae_spread_s": round(vae_spread, 4),
        "teacher_img_per_s": round(B / tea_s, 2),
        "teacher_spread_s": round(tea_spread, 4),
        "encode_img_per_s_all_views": round(B / model_s, 2),
        "bytes_per_sample": {k: int(v) for k, v in per_sample.items()},
        "raw_bytes_per_sample": {"latents": views * 2 * 4 * 32 * 32 * 4, "dinov2-vit-b": views * (256 * 768 + 768) * 2},
    }


def bench_pipeline(args: argparse.Namespace) -> dict:
    from repa_cache.cache.stats import cache_stats
    from repa_cache.pipeline.plan import PrecomputeConfig
    from repa_cache.pipeline.precompute import precompute

    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_images(Path(tmp) / "images", per_class=max(1, args.images // len(DEMO_CLASSES)), bad_inputs=False)
        n = sum(1 for p in data.rglob("*") if p.is_file())
        cfg = PrecomputeConfig(
            data=str(data), out=str(Path(tmp) / "cache"), vae="tiny", teachers=("tiny",), flip=args.flip,
            shard_size=args.shard_size, batch_size=args.batch_size, device=args.device, workers=args.workers, quiet=True,
        )
        t0 = time.perf_counter()
        precompute(cfg)
        wall = time.perf_counter() - t0
        s = cache_stats(cfg.out)
    return {
        "mode": "pipeline (tiny presets, end to end incl. dask start-up)",
        "device": _device_name(torch.device(args.device)),
        "images": n,
        "views": 2 if args.flip else 1,
        "workers": args.workers,
        "wall_s": round(wall, 2),
        "img_per_s": round(n / wall, 1),
        "bytes_per_sample": {g: v["bytes_per_sample"] for g, v in s["groups"].items()},
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("pipeline", "models"), default="models")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (fp32 weights, as precompute --precision bf16)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    res = bench_models(args) if args.mode == "models" else bench_pipeline(args)
    res["torch"] = torch.__version__
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
