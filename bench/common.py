"""Helpers shared by the training-side benchmarks (bench/train_step.py, bench/loader.py).

Everything here builds its inputs offline: demo images drawn on the fly, a cache made by the real
``precompute`` with the tiny presets, or a synthetic cache written directly with the cache writer
API with the real geometry of SD-VAE latents (4x32x32 float32 mean and std) and a registry
teacher's tokens (DINOv2-B: 256x768 float16), filled with random values. The synthetic cache has
realistic bytes for the reader; its values are noise.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")

import numpy as np
import pyarrow as pa
import torch

from repa_cache.cache.format import CODE_VERSION, CROP_RULE, FORMAT_VERSION, LATENTS, VIEW_NAMES, ArraySpec, CacheMeta, GroupMeta
from repa_cache.cache.writer import DEFAULT_CODEC, commit_group, create_cache, create_group, write_shard

# --------------------------------------------------------------------------------------------
# environment


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def env_info(device: torch.device) -> dict[str, Any]:
    info = {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": command_line(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_step_flops(tr: Any, batch: Any) -> int:
    """FLOPs of forward + backward of one training step ``tr`` (a ``train.step.Trainer``) on ``batch`` (eager model, attention through the math
    backend so that its matmuls are counted on every device; optimizer/EMA not counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from repa_cache.stages.devices import autocast

    draws = tr.method.draw(tr.transport, batch, tr.phase)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        with autocast(tr.device, tr.precision):
            out = tr.method.losses(tr.model, tr.transport, batch, tr.phases.coeff(0, tr.proj_coeff), tr.phase, draws)
        out.total.backward()
    tr.model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window: CUDA allocator peak, or the process's peak RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # "5" resets VmHWM (peak resident set) of this process (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_bytes(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what it is) since the last reset_peak_memory."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS of the main process (VmHWM)"
    except OSError:
        pass
    return None, "not available"


def median_spread(xs: list[float]) -> tuple[float, float]:
    """(median, max - min)."""
    return statistics.median(xs), (max(xs) - min(xs)) if xs else 0.0


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, iters: int = 20) -> float:
    """Measured dense matmul FLOP/s for square ``n x n`` operands (the MFU denominator)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    best = float("inf")
    for _ in range(3):  # best of three windows
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * iters / best


# --------------------------------------------------------------------------------------------
# inputs


def make_images(root: Path, count: int, seed: int = 0) -> Path:
    """Demo images (JPEG and PNG of 240..560 px, 4 classes), about ``count`` of them."""
    from repa_cache.pipeline.demo import DEMO_CLASSES, make_demo_images

    per_class = max(1, -(-count // len(DEMO_CLASSES)))
    return make_demo_images(root, per_class=per_class, seed=seed, bad_inputs=False)


def image_keys(root: Path) -> list[str]:
    from repa_cache.pipeline.source import list_source

    return [it.key for it in list_source(root).items]


def make_crops(images: Path, out: Path, resolution: int) -> Path:
    """The public REPA layout: each image center-cropped once (ADM rule) and stored as a
    ``resolution``-square PNG (what REPA's ``dataset_tools.py convert --transform=center-crop-dhariwal``
    writes); ``out/<key>.png`` for every image key."""
    from PIL import Image

    from repa_cache.stages.images import decode_and_crop

    for key in image_keys(images):
        res = decode_and_crop((images / key).read_bytes(), resolution)
        dst = out / f"{key}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(res.image).save(dst)
    return out


def synthetic_layout(
    num_samples: int,
    teacher: str = "dinov2-vit-b",
    keys: list[str] | None = None,
    resolution: int = 256,
    flip: bool = True,
    shard_size: int = 256,
    num_classes: int = 1000,
    latent_channels: int = 4,
    downsample: int = 8,
    feature_dtype: str = "float16",
    seed: int = 0,
) -> tuple[CacheMeta, pa.Table, tuple[GroupMeta, GroupMeta]]:
    """Root metadata, plan and the two groups (latents, teacher) of a synthetic cache.

    Latents group: SD-VAE geometry (``latent_channels x res/8 x res/8`` float32 mean and std,
    normalisation of ``AutoencoderKL``'s default config: scale 0.18215, no shift). Teacher group: the registry teacher's real metadata and geometry
    (from :func:`pipeline.groups.teacher_group_meta`; DINOv2-B: 256 tokens x 768, float16).
    Cache index ``i`` names source key ``keys[i % len(keys)]`` (the generated images, for the online
    path), labels are drawn uniformly from ``num_classes``.
    """
    from repa_cache.pipeline.groups import teacher_group_meta
    from repa_cache.stages.vae import latent_norm

    views = VIEW_NAMES if flip else VIEW_NAMES[:1]
    class_names = tuple(f"class{c:04d}" for c in range(num_classes))
    keys = keys or [f"synthetic/{i:08d}" for i in range(num_samples)]
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=num_samples).astype(np.int32)
    sample_keys = [keys[i % len(keys)] for i in range(num_samples)]
    meta = CacheMeta(
        format_version=FORMAT_VERSION,
        code_version=CODE_VERSION,
        num_samples=num_samples,
        shard_size=shard_size,
        resolution=resolution,
        crop=CROP_RULE,
        views=views,
        seed=seed,
        class_names=class_names,
        source={"kind": "synthetic", "root": "-", "num_items": num_samples, "num_classes": num_classes},
        base_fingerprint={"format_version": FORMAT_VERSION, "listing": f"synthetic-{num_samples}-{seed}", "num_samples": num_samples,
                          "resolution": resolution, "crop": CROP_RULE, "views": list(views), "seed": seed, "shard_size": shard_size},
    )
    plan = pa.table({
        "index": pa.array(np.arange(num_samples), pa.int64()),
        "key": pa.array(sample_keys, pa.string()),
        "label": pa.array(labels, pa.int32()),
        "class_name": pa.array(np.asarray(class_names)[labels], pa.string()),
        "source_position": pa.array(np.arange(num_samples), pa.int64()),
        "source_bytes": pa.array(np.zeros(num_samples), pa.int64()),
    })
    side = resolution // downsample
    lat_arrays = tuple(ArraySpec(n, (latent_channels, side, side), "float32", DEFAULT_CODEC) for n in ("mean", "std"))
    lat = GroupMeta(
        LATENTS, "latents",
        {"id": "synthetic (random values, sd-vae-ft-ema geometry)", "revision": None, "tiny": False, "class": "AutoencoderKL",
         "latent_norm": latent_norm({}).to_json(), "latent_channels": latent_channels, "downsample_factor": downsample,
         "latent_size": side, "input_range": "[-1, 1] = pixel / 127.5 - 1",
         "stored": "posterior mean and std (sample = mean + std * eps, then normalised with latent_norm)"},
        lat_arrays,
        {"base": meta.base_fingerprint, "group": LATENTS, "model": {"id": "synthetic"}, "arrays": [a.to_json() for a in lat_arrays],
         "format_version": FORMAT_VERSION},
    )
    return meta, plan, (lat, teacher_group_meta(meta, teacher, feature_dtype))


def synthetic_block(g: GroupMeta, n: int, views: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` samples of random values for each array of a synthetic group, scaled as real ones."""
    block = {}
    for a in g.arrays:
        shape = (n, views, *a.sample_shape)
        if a.name == "std":  # posterior std: small and positive
            block[a.name] = rng.uniform(0.01, 0.1, size=shape).astype(a.dtype)
        elif a.name == "mean":  # SD-VAE latents before scaling have std ~5
            block[a.name] = (5 * rng.standard_normal(size=shape, dtype=np.float32)).astype(a.dtype)
        else:  # final-norm ViT tokens: ~unit scale
            block[a.name] = rng.standard_normal(size=shape, dtype=np.float32).astype(a.dtype)
    return block


def write_synthetic_cache(
    out: Path,
    num_samples: int,
    teacher: str = "dinov2-vit-b",
    keys: list[str] | None = None,
    resolution: int = 256,
    flip: bool = True,
    shard_size: int = 256,
    num_classes: int = 1000,
    latent_channels: int = 4,
    downsample: int = 8,
    feature_dtype: str = "float16",
    seed: int = 0,
) -> Path:
    """A committed cache with the real geometry and random values, written with the writer API
    (:func:`synthetic_layout`). One shard of random values is generated and written to every shard
    (the reader cannot tell; compression is per sample)."""
    meta, plan, groups = synthetic_layout(num_samples, teacher, keys, resolution, flip, shard_size, num_classes, latent_channels,
                                          downsample, feature_dtype, seed)
    create_cache(out, meta, plan)
    rng = np.random.default_rng(seed)
    n0 = min(shard_size, num_samples)
    for g in groups:
        create_group(out, meta, g)
        block = synthetic_block(g, n0, len(meta.views), rng)
        for s in range(meta.num_shards):
            start, stop = meta.shard_range(s)
            write_shard(out, meta, g, s, {k: v[: stop - start] for k, v in block.items()},
                        [["ok", "", resolution, resolution]] * (stop - start), "synthetic" + "0" * 55)
        commit_group(out, meta, g)
    return out


def precompute_cache(images: Path, out: Path, teacher: str = "tiny", shard_size: int = 64, batch_size: int = 16) -> Path:
    """A cache made by the real stage one (tiny VAE + a tiny teacher: the presets that load offline)."""
    from repa_cache.pipeline.plan import PrecomputeConfig
    from repa_cache.pipeline.precompute import precompute

    precompute(PrecomputeConfig(data=str(images), out=str(out), vae="tiny", teachers=(teacher,), flip=True,
                                shard_size=shard_size, batch_size=batch_size, device="cpu", workers=1, processes=False, quiet=True))
    return out


def cache_teachers(cache: Path) -> list[str]:
    from repa_cache.cache.format import TEACHER_PREFIX
    from repa_cache.cache.reader import list_groups

    return [g[len(TEACHER_PREFIX):] for g in list_groups(Path(cache)) if g.startswith(TEACHER_PREFIX)]


def bytes_per_sample(cache: Path, groups: Iterable[str]) -> dict[str, dict[str, float]]:
    """Per sample and per array of the given groups: ``stored`` (compressed, all views),
    ``decoded`` (raw, all views), and ``views`` per inner chunk (1 where a chunk holds one view, so
    a read of the drawn view touches ``stored / V`` and ``decoded / V`` bytes)."""
    from repa_cache.cache.layout import load_records
    from repa_cache.cache.reader import CacheReader

    r = CacheReader(cache, groups=list(groups))
    out: dict[str, dict[str, float]] = {}
    for g, info in r.groups.items():
        records = load_records(r.root, r.meta, g)
        for name, arr in info.arrays.items():
            out[f"{g}/{name}"] = {
                "stored": sum(rec.stored_bytes[name] for rec in records.values()) / r.num_samples,
                "decoded": float(np.prod(arr.shape[1:]) * arr.dtype.itemsize),
                "views": float(arr.shape[1]),
                "views_per_chunk": float(arr.chunks[1]),
            }
    return out


# --------------------------------------------------------------------------------------------
# page cache


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def resident_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages in the OS page cache (mincore), or None where it cannot be asked."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = _libc()
        page = os.sysconf("SC_PAGE_SIZE")
        total = resident = 0
        for f in files:
            size = f.stat().st_size
            if size == 0:
                continue
            fd = os.open(f, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                if addr in (None, ctypes.c_void_p(-1).value):
                    return None
                try:
                    n = -(-size // page)
                    vec = (ctypes.c_ubyte * n)()
                    if libc.mincore(addr, size, vec) != 0:
                        return None
                    total += n
                    resident += sum(v & 1 for v in vec)
                finally:
                    libc.munmap(addr, size)
            finally:
                os.close(fd)
        return resident / total if total else None
    except (OSError, AttributeError):
        return None


def drop_page_cache(files: list[Path]) -> bool:
    """Evict the files from the page cache (fsync, then posix_fadvise DONTNEED). False where the OS
    has no posix_fadvise. Needs no privileges, unlike /proc/sys/vm/drop_caches."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def warm_page_cache(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


# --------------------------------------------------------------------------------------------
# output


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
