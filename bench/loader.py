"""The trainer's reader alone: samples/s and MB/s of ``CacheBatches`` + ``make_loader`` (+ ``to_device``
on a GPU) for several DataLoader worker counts, block sizes, and a cold or warm page cache.

One loader process (the trainer's main process and its workers) feeds one GPU in ``repa train``
(torchrun starts one per GPU); the last column says how many GPUs' worth of samples one loader
delivers at a given per-GPU consumption rate (default 350 img/s, about SiT-XL/2 at batch 256 on
one modern GPU; pass the rate measured by ``bench/train_step.py`` with ``--gpu-rate``).

* warm: every cache file is read once before the run (page cache full);
* verify on/off: the trainer checks every chunk it reads against the shard records (``repa
  train``'s default; ``--no-verify`` skips the record check). In a cache of format v2 that is one
  record and one shard index per shard a process touches, and zarr's crc32c of each chunk read
  (done with or without it); a v1 cache is hashed whole-shard on first touch instead;
* cold: before each configuration the cache files are evicted from the page cache with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` (no privileges needed); the resident fraction is checked
  with ``mincore`` and reported, so a cold run that was not cold shows it.

Bytes: ``delivered`` = bytes of the batch tensors handed to the trainer (one view per sample);
``decoded`` = bytes the reader decompresses (the latents and patch tokens the trainer uses; the
drawn view of each sample where a chunk holds one view, every stored view otherwise);
``stored`` = compressed bytes on disk for those reads (what a cold read pulls off disk).

Examples::

    python bench/loader.py                                    # CPU defaults: batch 16, workers 0,2,4,8
    python bench/loader.py --device cuda --batch-size 256 --steps 8
    python bench/loader.py --cache /data/imagenet-cache --teacher dinov2-vit-b --states cold
    python bench/loader.py --latents f16d32                   # an E2E-VAVAE / VA-VAE geometry cache (32x16x16)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from common import (  # type: ignore[import-not-found]  # run as python bench/loader.py
    bytes_per_sample,
    cache_files,
    cache_teachers,
    drop_page_cache,
    env_info,
    markdown_table,
    resident_fraction,
    sync,
    warm_page_cache,
    write_synthetic_cache,
)

from repa_cache.cache.codec import FEATURE_CODECS, FLOAT16
from repa_cache.cache.copy import copy_cache
from repa_cache.cache.format import LATENTS, LatentNorm, teacher_group
from repa_cache.cache.reader import CacheReader
from repa_cache.stages.devices import resolve_device
from repa_cache.train.data import CacheBatches, DataConfig, make_loader, to_device

#: ``--latents``: (downsampling factor, latent channels).
LATENT_GEOMETRIES = {"f8d4": (8, 4), "f16d32": (16, 32)}


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def batches(args: argparse.Namespace, workers: int) -> tuple[int, int]:
    """(untimed, timed) batches of a configuration.

    At the start every worker is handed ``prefetch_factor`` (2) batches at once, so batches arrive
    in bursts of ``2 x workers`` (more so when the workers outnumber the cores and progress in
    lockstep). The untimed part is the first burst; the timed window runs from the end of one burst
    to the end of a later one (a whole multiple of ``2 x workers`` batches), otherwise it would count
    work done before it started.
    """
    burst = 2 * workers
    warmup = args.warmup if args.warmup is not None else max(1, burst)
    steps = args.steps if workers == 0 else -(-max(args.steps, burst) // burst) * burst
    return warmup, steps


def run_config(cache: Path, teachers: tuple[str, ...], args: argparse.Namespace, device: torch.device, workers: int,
               block: int, state: str, files: list[Path], scale: LatentNorm, verify: bool = True) -> dict[str, Any]:
    label = {"state": state, "workers": workers, "block": block, "verify": "on" if verify else "off"}
    if state == "cold":
        ok = drop_page_cache(files)
        if not ok:
            return {**label, "note": "cold not possible: no posix_fadvise"}
    else:
        warm_page_cache(files)
    resident = resident_fraction(files)
    warmup, steps = batches(args, workers)
    n = warmup + steps
    ds = CacheBatches(DataConfig(str(cache), teachers, args.batch_size, seed=0, block_size=block, num_workers=workers,
                                 verify_checksums=verify))
    if n > ds.batches_per_epoch:
        print(f"note: {n} batches > {ds.batches_per_epoch} per epoch: some samples are read twice (warm the second time)")
    t0 = time.perf_counter()
    it = iter(make_loader(ds, 0, n, pin_memory=device.type == "cuda"))
    delivered = 0
    t_first = t_start = None
    for i in range(n):
        batch = next(it)
        if device.type == "cuda":
            to_device(batch, scale, teachers, device, ds.codecs)
            sync(device)
        if i == 0:
            t_first = time.perf_counter() - t0
        if i == warmup - 1:
            t_start = time.perf_counter()
        elif i >= warmup:
            delivered += sum(v.numel() * v.element_size() for k, v in batch.items() if k not in ("step",))
    t_end = time.perf_counter()
    dt, total = t_end - t_start, t_end - t0
    del it
    samples = steps * args.batch_size
    return {
        **label,
        "resident_before": None if resident is None else round(resident, 3),
        "first_batch_s": t_first,
        "incl_startup_samples_per_s": n * args.batch_size / total,
        "batches": f"{warmup}+{steps}",
        "samples_per_s": samples / dt,
        "delivered_MB_s": delivered / dt / 1e6,
        "decoded_MB_s": samples * args.read_bytes["decoded"] / dt / 1e6,
        "stored_MB_s": samples * args.read_bytes["stored"] / dt / 1e6,
        "gpus_fed": samples / dt / args.gpu_rate,
        "seconds": dt,
    }


def main() -> None:
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: on purpose
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu: the reader alone; cuda: plus pinned memory and to_device (H2D) per batch")
    p.add_argument("--model", default="SiT-XL/2", help="the consumer the GPU rate refers to (label only)")
    p.add_argument("--gpu-rate", type=float, default=350.0, help="img/s one GPU consumes (default: ~SiT-XL/2)")
    p.add_argument("--teacher", default="dinov2-vit-b", help="teacher group to read (and the geometry of a generated cache)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: 256 on CUDA, 16 on CPU)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed batches per configuration, rounded up to a multiple of 2 x workers (default: 8 on CUDA, 4 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches per configuration (default: max(1, 2 x workers): the first burst)")
    p.add_argument("--workers", default="0,2,4,8", help="DataLoader worker counts")
    p.add_argument("--block-sizes", default="16,256", help="DataConfig.block_size values")
    p.add_argument("--states", default="warm,cold", help="page-cache states: warm, cold")
    p.add_argument("--verify", default="on,off",
                   help="shard checksums on first read (repa train's default) and/or off (--no-verify): on,off measures the cost")
    p.add_argument("--cache", default=None, help="read this existing cache instead of generating one")
    p.add_argument("--samples", type=int, default=None, help="samples of the generated cache (default: one epoch of the longest configuration)")
    p.add_argument("--workdir", default=None, help="where the generated cache goes (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--latents", default="f8d4", choices=sorted(LATENT_GEOMETRIES),
                   help="latent geometry of a generated cache: f8d4 (SD-VAE, 4x32x32 at 256 px) or f16d32 (E2E-VAVAE, VA-VAE: 32x16x16)")
    p.add_argument("--feature-codec", default="float16", choices=FEATURE_CODECS,
                   help="store the teacher tokens in this codec: the cache is transcoded with `repa cache copy --feature-codec` first")
    args = p.parse_args()

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (256 if cuda else 16)
    args.steps = args.steps or (8 if cuda else 4)
    workers, blocks, states = _ints(args.workers), _ints(args.block_sizes), [s.strip() for s in args.states.split(",") if s.strip()]
    if any(s not in ("warm", "cold") for s in states):
        p.error("--states takes warm and/or cold")
    verifies = [v.strip() for v in args.verify.split(",") if v.strip()]
    if not verifies or any(v not in ("on", "off") for v in verifies):
        p.error("--verify takes on and/or off")

    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-loader-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if args.cache:
            cache = Path(args.cache)
            have = cache_teachers(cache)
            teacher = args.teacher if args.teacher in have else have[0]
        else:
            teacher = args.teacher
            longest = max(sum(batches(args, w)) for w in workers)
            samples = args.samples or longest * args.batch_size
            down, channels = LATENT_GEOMETRIES[args.latents]
            cache = write_synthetic_cache(tmp / "cache", samples, teacher=teacher, downsample=down, latent_channels=channels)
        if args.feature_codec != FLOAT16:
            cache = copy_cache(cache, tmp / f"cache-{args.feature_codec}", feature_codec=args.feature_codec, quiet=True).dst.local
        prep_s = time.perf_counter() - t0
        teachers = (teacher,)
        groups = [LATENTS, teacher_group(teacher)]
        sizes = bytes_per_sample(cache, groups)
        used = [k for k in sizes if not k.endswith(("/cls", "/cls_scale"))]  # what CacheBatches reads (CacheBatches.fields)
        # bytes a read of the drawn view touches: 1/V of the sample's where a chunk holds one view
        args.read_bytes = {kind: sum(sizes[k][kind] * (1 / sizes[k]["views"] if sizes[k]["views_per_chunk"] == 1 else 1) for k in used)
                           for kind in ("stored", "decoded")}
        reader = CacheReader(cache, groups=groups)
        scale = LatentNorm.of_latents(reader.group(LATENTS).meta.model)
        files = cache_files(cache)
        info = {
            **env_info(device),
            "cache": str(cache) if args.cache else f"generated synthetic ({reader.num_samples} samples, {len(reader.views)} views)",
            "teacher": teacher,
            "feature_codec": args.feature_codec,
            "num_samples": reader.num_samples,
            "views": list(reader.views),
            "shard_size": reader.meta.shard_size,
            "batch": args.batch_size,
            "steps": args.steps,
            "cache_bytes_on_disk": sum(f.stat().st_size for f in files),
            "bytes_per_sample": {k: {kind: round(v) for kind, v in d.items()} for k, d in sizes.items()},
            "read_bytes_per_sample": {k: round(v) for k, v in args.read_bytes.items()},
            "consumer": f"{args.model} at {args.gpu_rate:g} img/s per GPU",
            "prepare_s": round(prep_s, 1),
        }
        del reader
        results = []
        for state, block, w, v in itertools.product(states, blocks, workers, verifies):
            r = run_config(cache, teachers, args, device, w, block, state, files, scale, verify=v == "on")
            results.append(r)
            if "samples_per_s" in r:
                print(f"{state:4s} block {block:4d} workers {w} verify {v:3s}: {r['samples_per_s']:.0f} samples/s, "
                      f"{r['delivered_MB_s']:.0f} MB/s delivered, {r['stored_MB_s']:.0f} MB/s stored, "
                      f"resident before {r['resident_before']}", flush=True)
            else:
                print(f"{state} block {block} workers {w}: {r['note']}")
        info["load_avg_at_end"] = list(os.getloadavg())
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{info['device']} | torch {info['torch']} | {info['command']}")
    print(markdown_table(results, ["state", "block", "workers", "verify", "batches", "resident_before", "samples_per_s", "delivered_MB_s",
                                   "decoded_MB_s", "stored_MB_s", "gpus_fed", "first_batch_s", "incl_startup_samples_per_s"]))
    out = {"info": info, "results": results}
    text = json.dumps(out, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
