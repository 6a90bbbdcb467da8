"""Feature codecs in numbers: stored bytes per view, cosine to the float32 tokens, REPA loss and
gradient against float16, the 16-bit latent std, and ImageNet-1k sizes.

Tokens are synthetic with the real geometry (DINOv2-B at 256 px: 256 patch tokens + CLS, 768 dims;
CLIP-L: 256 + CLS, 1024 dims), drawn to be harder than real features: Gaussian or Student-t(3)
values, two channels ``outlier`` times the others, per-token norms over two decades. Bytes are
those of the writer's compressor (Blosc zstd-3, byte shuffle) on one chunk = one view of one sample.

Examples::

    python bench/codec.py
    python bench/codec.py --cache CACHE_INT8 --cache CACHE_FLOAT16 --json codec.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numcodecs
import numpy as np
import torch

from repa_cache.cache.codec import Int8Codec, decode_numpy, encode_int8, token_cosine
from repa_cache.train.loss import repa_loss

BLOSC = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE)
IMAGENET = 1_281_167
LATENT_BYTES_PER_VIEW = 52_700 / 2  # SD-VAE mean + std float32, measured on real images (docs/benchmarks.md, stage one)


def tokens(n: int, dim: int, outlier: float, tail: str, rng: np.random.Generator) -> np.ndarray:
    """(n, dim) float32 synthetic teacher tokens (see the module docstring)."""
    x = rng.standard_t(3, size=(n, dim)) if tail == "t3" else rng.standard_normal((n, dim))
    x[:, rng.choice(dim, 2, replace=False)] *= outlier
    x *= np.exp(rng.uniform(-2.3, 2.3, size=(n, 1)))
    return x.astype(np.float32)


def stored(a: np.ndarray) -> int:
    return len(BLOSC.encode(np.ascontiguousarray(a)))


def view_bytes(x: np.ndarray, codec: str) -> int:
    """Stored bytes of one view (T + 1 tokens: patch chunk + CLS chunk, plus scale chunks)."""
    patch, cls = x[:-1], x[-1]
    if codec == "float16":
        return stored(patch.astype(np.float16)) + stored(cls.astype(np.float16))
    spec = Int8Codec(power=0.5 if codec == "int8" else 1.0)
    qp, sp = encode_int8(patch, spec, "bench")
    qc, sc = encode_int8(cls[None], spec, "bench")
    return stored(qp) + stored(sp) + stored(qc[0]) + stored(sc[0])


def decoded(x: np.ndarray, codec: str) -> np.ndarray:
    if codec == "float16":
        return x.astype(np.float16).astype(np.float32)
    spec = Int8Codec(power=0.5 if codec == "int8" else 1.0)
    q, s = encode_int8(x, spec, "bench")
    return decode_numpy(q, s, spec)


def cos_summary(c: np.ndarray) -> dict[str, float]:
    return {"min": float(c.min()), "q001": float(np.quantile(c, 0.001)), "mean": float(c.mean())}


def synthetic(views: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for dim in (768, 1024):
        for tail in ("gauss", "t3"):
            for outlier in (1.0, 10.0, 30.0, 100.0):
                rng = np.random.default_rng(seed)
                xs = [tokens(257, dim, outlier, tail, rng) for _ in range(views)]
                for codec in ("float16", "int8", "int8-linear"):
                    cos = np.concatenate([token_cosine(x, decoded(x, codec)) for x in xs])
                    rows.append({"dim": dim, "tail": tail, "outlier": outlier, "codec": codec,
                                 "bytes_per_view": float(np.mean([view_bytes(x, codec) for x in xs])), **cos_summary(cos)})
    return rows


def loss_and_grad(seed: int) -> list[dict[str, Any]]:
    """REPA loss and its gradient for float16 vs int8 targets on one fixed batch (B=16, DINOv2-B
    geometry, t3 tokens with 30x outliers). ``random``: an untrained projector (random output);
    ``aligned``: a projector output close to the target (cos ~0.9), as later in training. The
    ``float32`` row is the float16 cache's own distance from the encoder's output."""
    rng = np.random.default_rng(seed)
    y = tokens(16 * 256, 768, 30.0, "t3", rng).reshape(16, 256, 768)
    targets = {c: torch.from_numpy(decoded(y.reshape(-1, 768), c).reshape(y.shape)) for c in ("float16", "int8", "int8-linear")}
    targets["float32"] = torch.from_numpy(y)
    out = []
    for kind in ("random", "aligned"):
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(y.shape, generator=g)
        yt = torch.from_numpy(y)
        base = noise if kind == "random" else yt / yt.norm(dim=-1, keepdim=True) + 0.5 * noise / noise.norm(dim=-1, keepdim=True)
        res = {}
        for c, t in targets.items():
            z = base.clone().requires_grad_(True)
            loss, _ = repa_loss([z], [t])
            loss.backward()
            assert z.grad is not None
            res[c] = (float(loss.detach()), z.grad.clone())
        l16, g16 = res["float16"]
        for c in ("float32", "int8", "int8-linear"):
            lc, gc = res[c]
            out.append({"projector": kind, "codec": c, "loss_float16": l16, "loss": lc, "loss_rel_diff": abs(lc - l16) / abs(l16),
                        "grad_rel_diff": float((gc - g16).norm() / g16.norm())})
    return out


def latent_std(seed: int, caches: list[str]) -> list[dict[str, Any]]:
    """How much a sampled latent ``mean + std * eps`` moves when std is stored in 16 bits, in units
    of the latents' own standard deviation (max over every value, and RMS)."""
    from repa_cache.cache.reader import CacheReader

    sources: list[tuple[str, np.ndarray, np.ndarray]] = []
    rng = np.random.default_rng(seed)
    # SD-VAE-like: latent values of std ~5 (before the 0.18215 scale), posterior std 1e-3 .. 0.5
    sources.append(("synthetic SD-VAE-like", (5 * rng.standard_normal((64, 4, 32, 32))).astype(np.float32),
                    np.exp(rng.uniform(np.log(1e-3), np.log(0.5), (64, 4, 32, 32))).astype(np.float32)))
    for path in caches:
        r = CacheReader(path, groups=["latents"])
        got = r.read(r.valid_indices())
        sources.append((f"cache {path}", got["latents/mean"], got["latents/std"]))
    out = []
    for name, mean, std in sources:
        eps = np.random.default_rng(seed + 1).standard_normal(mean.shape).astype(np.float32)
        x = mean + std * eps
        sx = float(x.std())
        for dt in ("float16", "bfloat16"):
            s16 = torch.from_numpy(std).to(getattr(torch, dt)).float().numpy()
            d = (mean + s16 * eps) - x
            out.append({"source": name, "std_dtype": dt, "max_abs_diff_over_std": float(np.abs(d).max() / sx),
                        "rms_diff_over_std": float(np.sqrt((d**2).mean()) / sx)})
    return out


def imagenet(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ImageNet-1k (1.28M images, 2 views) for DINOv2-B and DINOv2-B + CLIP-L, per codec, from the
    synthetic bytes per view of Student-t tokens with 30x outliers (the harder to compress of the
    measured cases is the Gaussian one; both are given)."""
    out = []
    for tail in ("gauss", "t3"):
        per = {(r["dim"], r["codec"]): r["bytes_per_view"] for r in rows if r["tail"] == tail and r["outlier"] == 30.0}
        for codec in ("float16", "int8"):
            one = LATENT_BYTES_PER_VIEW + per[(768, codec)]
            two = one + per[(1024, codec)]
            out.append({"tail": tail, "codec": codec, "bytes_per_view_dinov2b": one, "tb_dinov2b": one * IMAGENET * 2 / 1e12,
                        "tb_dinov2b_clipl": two * IMAGENET * 2 / 1e12})
    return out


def reader_rate(samples: int, batch: int, rounds: int, seed: int) -> list[dict[str, Any]]:
    """Samples/s of ``CacheReader.read_views`` (one process, warm page cache, random indices and
    views, the trainer's fields) on a synthetic DINOv2-B cache in float16 and transcoded to int8,
    decoded on the host or raw; and the bytes per sample a trainer moves to the GPU."""
    import tempfile
    from pathlib import Path

    from common import write_synthetic_cache  # type: ignore[import-not-found]  # run as python bench/codec.py

    from repa_cache.cache.copy import copy_cache
    from repa_cache.cache.reader import CacheReader

    out = []
    with tempfile.TemporaryDirectory(prefix="bench-codec-") as tmp:
        f16 = write_synthetic_cache(Path(tmp) / "f16", samples, shard_size=min(256, samples))
        i8 = copy_cache(f16, Path(tmp) / "i8", feature_codec="int8", quiet=True).dst.local
        rng = np.random.default_rng(seed)
        for name, path, raw in (("float16", f16, False), ("int8 decoded", i8, False), ("int8 raw", i8, True)):
            reader = CacheReader(path)
            g = next(k for k in reader.groups if k != "latents")
            fields = ["latents/mean", "latents/std", f"{g}/patch"]
            best = 0.0
            for _ in range(rounds):
                idx = rng.choice(reader.valid_indices(), size=(8, batch))
                t0 = time.perf_counter()
                for b in idx:
                    got = reader.read_views(b, rng.integers(0, len(reader.views), size=batch), fields=fields, raw=raw)
                best = max(best, idx.size / (time.perf_counter() - t0))
            h2d = sum(v.nbytes for k, v in got.items() if "/" in k) / batch
            out.append({"read": name, "samples_per_s": best, "h2d_bytes_per_sample": h2d})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--views", type=int, default=16, help="synthetic views per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", action="append", default=[], help="a cache whose latents to use for the std measurement (repeatable)")
    p.add_argument("--reader-samples", type=int, default=0, help="also time the reader on a synthetic cache of this many samples")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = synthetic(args.views, args.seed)
    res = {"synthetic": rows, "loss": loss_and_grad(args.seed), "latent_std": latent_std(args.seed, args.cache),
           "imagenet": imagenet(rows)}
    if args.reader_samples:
        res["reader"] = reader_rate(args.reader_samples, 16, 5, args.seed)
    for key, table in res.items():
        print(f"== {key}")
        for r in table:
            print("  " + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
