"""``repa stats``: what is in a cache, in numbers.

Counts come from the manifest; storage from the files on disk; latent and feature statistics are
computed with dask over the zarr arrays. Feature statistics read the first ``max_samples`` valid
samples: the cache order is a seeded random permutation, so that prefix is a uniform sample.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import MANIFEST_FILE, LatentNorm, sha256_json
from repa_cache.cache.layout import open_zarr, zarr_array
from repa_cache.cache.reader import check_plan, commit_record, group_arrays, group_meta, list_groups, open_meta, read_manifest
from repa_cache.cache.storage import StorePath

DEFAULT_MAX_SAMPLES = 10_000


def _reason_kind(reason: str) -> str:
    """A reason with its numbers masked, so that like outcomes count together."""
    return re.sub(r"\d+", "N", reason.split(":")[0] if reason.startswith("corrupt") else reason)


def _dir_bytes(path: StorePath) -> int:
    return sum(path.find().values())


def cache_stats(path: str | Path, max_samples: int = DEFAULT_MAX_SAMPLES, with_histograms: bool = False) -> dict[str, Any]:
    root, meta = open_meta(path)
    out: dict[str, Any] = {
        "path": str(root),
        "format_version": meta.format_version,
        "code_version": meta.code_version,
        "samples": meta.num_samples,
        "shards": meta.num_shards,
        "shard_size": meta.shard_size,
        "resolution": meta.resolution,
        "crop": meta.crop,
        "views": list(meta.views),
        "seed": meta.seed,
        "source": meta.source,
        "fingerprint": sha256_json(meta.base_fingerprint)[:16],
        "classes": len(meta.class_names),
    }
    check_plan(root, meta)  # num_samples is the row count of a real file before anything is sized by it
    present = list_groups(root)
    committed = any(commit_record(root, g) is not None for g in present)
    valid = np.ones(meta.num_samples, dtype=bool)
    if committed or (root / MANIFEST_FILE).exists():  # required once a group is committed
        m = read_manifest(root, meta)
        status = m.column("status").to_pylist()
        valid = np.asarray(status) != "skipped"
        labels = np.asarray(m.column("label").to_pylist())
        counts = Counter(labels[valid].tolist())
        out["per_class"] = {meta.class_names[k]: int(counts.get(k, 0)) for k in range(len(meta.class_names))}
        out["outcomes"] = dict(Counter(status))
        reason = m.column("reason").to_pylist()
        for kind in ("skipped", "converted"):
            found = Counter(_reason_kind(part) for st, r in zip(status, reason) if st == kind for part in r.split("; "))
            out[f"{kind}_by_reason"] = dict(found.most_common())
    else:
        out["outcomes"] = "unknown (no group committed yet)"
    idx = np.flatnonzero(valid)[:max_samples]
    out["stats_samples"] = int(idx.size)
    hist: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for group in present:
        gmeta = group_meta(root, group)
        commit = commit_record(root, group)
        zg = open_zarr(root / group)
        checked = group_arrays(root, meta, group, gmeta)  # shapes agree with the bounded metadata
        arrays = {}
        nbytes = 0
        for spec in gmeta.arrays:
            arr = checked[spec.name]
            arrays[spec.name] = {"shape": list(arr.shape), "dtype": spec.dtype, "codec": spec.codec}
            nbytes += arr.nbytes
        stored = _dir_bytes(root / group)
        g: dict[str, Any] = {
            "kind": gmeta.kind,
            "committed": commit is not None,
            "model": gmeta.model,
            "weights_sha256": (commit or {}).get("weights_sha256"),
            "arrays": arrays,
            "bytes_on_disk": stored,
            "bytes_uncompressed": nbytes,
            "compression_ratio": round(nbytes / stored, 3) if stored else None,
            "bytes_per_sample": round(stored / max(1, int(valid.sum())), 1),
        }
        if commit is not None and idx.size:
            if gmeta.kind == "latents":
                g["latent_stats"], h = _latent_stats(zg, idx)
            else:
                g["feature_stats"], h = _feature_stats(zg, idx)
            if with_histograms:
                hist[group] = h
        groups[group] = g
    out["groups"] = groups
    out["bytes_on_disk"] = _dir_bytes(root)
    if with_histograms:
        out["_histograms"] = hist
    return out


def _rows(arr: zarr.Array, idx: np.ndarray) -> da.Array:
    """The rows ``idx`` (ascending) of a zarr array as a dask array, chunked per shard."""
    x = da.from_zarr(arr, chunks=(arr.shards or arr.chunks)[0:1] + arr.shape[1:])
    return x[: int(idx[-1]) + 1][idx]


def _latent_stats(zg: zarr.Group, idx: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    mean = _rows(zarr_array(zg, "mean"), idx).astype(np.float64)  # (n, V, C, h, w)
    std = _rows(zarr_array(zg, "std"), idx).astype(np.float64)
    axes = (0, 1, 3, 4)
    mu, var_mu, e_var = da.compute(mean.mean(axis=axes), mean.var(axis=axes), (std**2).mean(axis=axes))
    # A latent sample is mean + std * eps: its variance is Var(mean) + E[std^2].
    sample_std = np.sqrt(var_mu + e_var)
    stats = {
        "channel_mean": [round(float(v), 5) for v in mu],
        "channel_std_of_sample": [round(float(v), 5) for v in sample_std],
        "channel_mean_posterior_std": [round(float(v), 5) for v in np.sqrt(e_var)],
        "suggested_scale": round(float(1.0 / np.sqrt(np.mean(var_mu + e_var))), 5),
    }
    sample = mean[: min(512, len(idx))].compute()
    return stats, {"latent mean values": sample.reshape(-1)}


def _feature_stats(zg: zarr.Group, idx: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    patch = _rows(zarr_array(zg, "patch"), idx).astype(np.float32)  # (n, V, T, D)
    cls = _rows(zarr_array(zg, "cls"), idx).astype(np.float32)  # (n, V, D)
    pn = da.sqrt((patch**2).sum(axis=-1))
    cn = da.sqrt((cls**2).sum(axis=-1))
    pm, ps, pmin, pmax, cm, cs, pnorms = da.compute(pn.mean(), pn.std(), pn.min(), pn.max(), cn.mean(), cn.std(), pn[:512])
    stats = {
        "patch_norm_mean": round(float(pm), 4),
        "patch_norm_std": round(float(ps), 4),
        "patch_norm_min": round(float(pmin), 4),
        "patch_norm_max": round(float(pmax), 4),
        "cls_norm_mean": round(float(cm), 4),
        "cls_norm_std": round(float(cs), 4),
    }
    return stats, {"patch token L2 norm": np.asarray(pnorms).reshape(-1)}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _values(v: tuple[float, ...]) -> str:
    """One value as itself, per-channel values as a list."""
    return f"{v[0]:g}" if len(v) == 1 else "[" + ", ".join(f"{x:g}" for x in v) + "]"


def format_stats(s: dict[str, Any]) -> str:
    """A readable multi-line table of :func:`cache_stats`."""
    lines = [
        f"cache          {s['path']}  (format v{s['format_version']}, code {s['code_version']})",
        f"source         {s['source'].get('kind')} {s['source'].get('root')}",
        f"samples        {s['samples']} in {s['shards']} shards of {s['shard_size']}; views {', '.join(s['views'])}",
        f"resolution     {s['resolution']} px, crop {s['crop']}, order seed {s['seed']}",
        f"fingerprint    {s['fingerprint']}",
        f"on disk        {_human(s['bytes_on_disk'])}",
        f"outcomes       {s['outcomes']}",
    ]
    for reason, n in s.get("skipped_by_reason", {}).items():
        lines.append(f"  skipped      {n:>6}  {reason}")
    for reason, n in s.get("converted_by_reason", {}).items():
        lines.append(f"  converted    {n:>6}  {reason}")
    per_class = s.get("per_class", {})
    if per_class:
        vals = list(per_class.values())
        shown = ", ".join(f"{k}:{v}" for k, v in list(per_class.items())[:10])
        more = f", ... ({len(per_class)} classes)" if len(per_class) > 10 else ""
        lines.append(f"classes        {s['classes']} (per class min {min(vals)}, max {max(vals)}): {shown}{more}")
    for name, g in s["groups"].items():
        m = g["model"]
        model = m.get("id") or m.get("timm_id")
        tiny = "  [TINY random-init preset]" if m.get("tiny") else ""
        state = "committed" if g["committed"] else "NOT COMMITTED"
        lines.append("")
        lines.append(f"[{name}]  {state}  model {model}{tiny}")
        for an, a in g["arrays"].items():
            codec = a["codec"]
            lines.append(f"  {an:<6} shape {tuple(a['shape'])} {a['dtype']}  {codec['name']}/{codec.get('cname')} L{codec.get('clevel')}")
        ratio = g["compression_ratio"]
        lines.append(
            f"  storage      {_human(g['bytes_on_disk'])} on disk, {_human(g['bytes_uncompressed'])} raw, "
            f"ratio {ratio}, {_human(g['bytes_per_sample'])}/sample"
        )
        if "latent_stats" in g:
            ls = g["latent_stats"]
            norm = LatentNorm.of_latents(m)
            lines.append(f"  latent norm  scale {_values(norm.scale)}, shift {_values(norm.shift)} (from the VAE config); "
                         f"measured 1/std {ls['suggested_scale']}")
            lines.append(f"  ch mean      {ls['channel_mean']}")
            lines.append(f"  ch std       {ls['channel_std_of_sample']} (of a posterior sample)")
        if "feature_stats" in g:
            fs = g["feature_stats"]
            lines.append(f"  tokens       {m.get('num_tokens')} x {m.get('dim')} (grid {m.get('grid')}, input {m.get('input_size')} px)")
            lines.append(
                f"  patch norm   mean {fs['patch_norm_mean']} std {fs['patch_norm_std']} "
                f"min {fs['patch_norm_min']} max {fs['patch_norm_max']}"
            )
            lines.append(f"  cls norm     mean {fs['cls_norm_mean']} std {fs['cls_norm_std']}")
    lines.append("")
    lines.append(f"statistics over the first {s['stats_samples']} valid samples (cache order is a random permutation)")
    return "\n".join(lines)


def check_plot_path(path: str | Path) -> None:
    """UsageError (one line) for a plot file matplotlib cannot write: an extension it has no
    writer for, or a folder that does not exist. Cheap: call it before computing statistics."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    p = Path(path)
    ext = p.suffix.lower().lstrip(".")
    if ext not in formats:
        raise UsageError(f"--plot {path}: unsupported file type '{p.suffix or '(none)'}'; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))}")
    if p.is_dir():
        raise UsageError(f"--plot {path} is a folder, not a file name")
    if not p.parent.is_dir():
        raise UsageError(f"--plot {path}: folder {p.parent} does not exist")


def plot_stats(s: dict[str, Any], path: str | Path) -> None:
    """Histograms of latent values, token norms, and per-class counts into one image (its type
    from the file name's extension: .png, .pdf, .svg, ...)."""
    check_plot_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hists = s.get("_histograms", {})
    panels = [(f"{g}: {k}", v) for g, h in hists.items() for k, v in h.items()]
    n = len(panels) + (1 if s.get("per_class") else 0)
    fig, axes = plt.subplots(1, max(1, n), figsize=(5 * max(1, n), 3.5), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        ax.hist(np.asarray(values, dtype=np.float64), bins=60, color="#3b6ea5")
        ax.set_title(title, fontsize=9)
    if s.get("per_class"):
        ax = axes[0][len(panels)]
        ax.bar(range(len(s["per_class"])), list(s["per_class"].values()), color="#a55b3b")
        ax.set_title("samples per class", fontsize=9)
        ax.set_xlabel("class index")
    fig.suptitle(os.path.basename(s["path"].rstrip("/")), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
