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
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import zarr

from repa_cache.cache.chunks import chunk_layout
from repa_cache.cache.codec import Int8Codec, decode_numpy, scale_name
from repa_cache.cache.defaults import DEFAULT_MAX_SAMPLES
from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import MANIFEST_FILE, LatentNorm, sha256_json
from repa_cache.cache.latent_stats import LatentStats, describe_latent_stats, read_latent_stats
from repa_cache.cache.layout import bulk_reads, open_zarr, zarr_array
from repa_cache.cache.progress import format_bytes
from repa_cache.cache.reader import check_plan, commit_record, group_arrays, group_meta, list_groups, open_meta, read_manifest
from repa_cache.cache.storage import StorePath

if TYPE_CHECKING:
    from matplotlib.figure import Figure



def _reason_kind(reason: str) -> str:
    """A reason with its numbers masked, so that like outcomes count together."""
    return re.sub(r"\d+", "N", reason.split(":")[0] if reason.startswith("corrupt") else reason)


def _dir_bytes(path: StorePath) -> int:
    return sum(path.find().values())


@bulk_reads()
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
            "bytes_per_view": round(stored / max(1, int(valid.sum()) * len(meta.views)), 1),
        }
        g["checksums"] = "chunk" if all(chunk_layout(a) is not None for a in checked.values()) else "shard"
        if gmeta.kind != "latents":  # how its tokens are stored, and (quantised) how close they are to the source
            g["feature_codec"] = gmeta.codec_name
            g["codec_check"] = (commit or {}).get("codec_check")
        if commit is not None and idx.size:
            if gmeta.kind == "latents":
                g["latent_stats"], h = _latent_stats(zg, idx)
                try:  # the dataset statistics, when computed (repa latent-stats)
                    dataset = read_latent_stats(root, commit["fingerprint_hash"])
                    if dataset is not None:
                        g["dataset_stats"] = dataset.to_json()
                except UsageError as e:
                    g["dataset_stats_problem"] = str(e)
            else:
                g["feature_stats"], h = _feature_stats(zg, idx, gmeta.codec)
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
    sample = mean[: min(512, len(idx))].compute()  # (n, V, C, h, w)
    return stats, {"channels": np.moveaxis(sample, 2, 0).reshape(sample.shape[2], -1), "samples": len(sample)}  # (C, n*V*h*w)


def _feature_stats(zg: zarr.Group, idx: np.ndarray, codec: Int8Codec | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    def tokens(name: str) -> da.Array:  # float32, decoded when quantised
        x = _rows(zarr_array(zg, name), idx)
        return x.astype(np.float32) if codec is None else decode_numpy(x, _rows(zarr_array(zg, scale_name(name)), idx), codec)

    patch = tokens("patch")  # (n, V, T, D)
    cls = tokens("cls")  # (n, V, D)
    pn = da.sqrt((patch**2).sum(axis=-1))
    cn = da.sqrt((cls**2).sum(axis=-1))
    pm, ps, pmin, pmax, cm, cs, pnorms, cnorms = da.compute(pn.mean(), pn.std(), pn.min(), pn.max(), cn.mean(), cn.std(),
                                                            pn[:512], cn[:512])
    stats = {
        "patch_norm_mean": round(float(pm), 4),
        "patch_norm_std": round(float(ps), 4),
        "patch_norm_min": round(float(pmin), 4),
        "patch_norm_max": round(float(pmax), 4),
        "cls_norm_mean": round(float(cm), 4),
        "cls_norm_std": round(float(cs), 4),
    }
    return stats, {"patch": np.asarray(pnorms).reshape(-1), "cls": np.asarray(cnorms).reshape(-1), "samples": len(pnorms)}


def _values(v: tuple[float, ...]) -> str:
    """One value as itself, per-channel values as a list."""
    return f"{v[0]:g}" if len(v) == 1 else "[" + ", ".join(f"{x:g}" for x in v) + "]"


CHECKSUMS_CHUNK = "crc32c per chunk, bound to the shard records (a trainer checks what it reads)"
CHECKSUMS_SHARD = ("sha256 per shard only (written before format v2): a trainer hashes each shard it touches whole, "
                   "in every loader process")


def format_stats(s: dict[str, Any]) -> str:
    """A readable multi-line table of :func:`cache_stats`."""
    lines = [
        f"cache          {s['path']}  (format v{s['format_version']}, code {s['code_version']})",
        f"source         {s['source'].get('kind')} {s['source'].get('root')}",
        f"samples        {s['samples']} in {s['shards']} shards of {s['shard_size']}; views {', '.join(s['views'])}",
        f"resolution     {s['resolution']} px, crop {s['crop']}, order seed {s['seed']}",
        f"fingerprint    {s['fingerprint']}",
        f"on disk        {format_bytes(s['bytes_on_disk'])}",
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
            f"  storage      {format_bytes(g['bytes_on_disk'])} on disk, {format_bytes(g['bytes_uncompressed'])} raw, "
            f"ratio {ratio}, {format_bytes(g['bytes_per_sample'])}/sample"
        )
        lines.append("  checksums    " + (CHECKSUMS_CHUNK if g.get("checksums") == "chunk" else CHECKSUMS_SHARD))
        if "feature_codec" in g:
            check = g.get("codec_check") or {}
            cos = (f"; cosine to the source at write: min {check['min']:.6f}, 0.1% {check['q001']:.6f}, mean {check['mean']:.6f} "
                   f"over {check['tokens']} tokens") if check.get("tokens") else ""
            lines.append(f"  codec        {g['feature_codec']}, {format_bytes(g['bytes_per_view'])}/view stored{cos}")
        if "latent_stats" in g:
            ls = g["latent_stats"]
            norm = LatentNorm.of_latents(m)
            lines.append(f"  latent norm  scale {_values(norm.scale)}, shift {_values(norm.shift)} (from the VAE config); "
                         f"measured 1/std {ls['suggested_scale']}")
            lines.append(f"  ch mean      {ls['channel_mean']}")
            lines.append(f"  ch std       {ls['channel_std_of_sample']} (of a posterior sample)")
            if "dataset_stats" in g:
                lines += ["  " + line for line in describe_latent_stats(LatentStats.from_json(g["dataset_stats"], "stats"))]
            elif "dataset_stats_problem" in g:
                lines.append(f"  dataset stats {g['dataset_stats_problem']}")
        if "feature_stats" in g:
            fs = g["feature_stats"]
            lines.append(f"  tokens       {m.get('num_tokens')} x {m.get('dim')} (grid {m.get('grid')}, input {m.get('input_size')} px)")
            if isinstance(m.get("hidden"), dict):
                h = m["hidden"]
                lines.append(f"  hidden       {h.get('num_tokens')} x {m.get('dim')} entering block {h.get('first_block')} "
                             f"(attention of blocks {h.get('first_block')}-{h.get('last_block')} of {h.get('depth')})")
            lines.append(
                f"  patch norm   mean {fs['patch_norm_mean']} std {fs['patch_norm_std']} "
                f"min {fs['patch_norm_min']} max {fs['patch_norm_max']}"
            )
            lines.append(f"  cls norm     mean {fs['cls_norm_mean']} std {fs['cls_norm_std']}")
    lines.append("")
    lines.append(f"statistics over the first {s['stats_samples']} valid samples (cache order is a random permutation)")
    return "\n".join(lines)


def check_plot_path(path: str | Path, flag: str = "--plot") -> None:
    """UsageError (one line) for a plot file matplotlib cannot write: an extension it has no
    writer for, or a folder that does not exist. Cheap: call it before computing statistics."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    p = Path(path)
    ext = p.suffix.lower().lstrip(".")
    if ext not in formats:
        raise UsageError(f"{flag} {path}: unsupported file type '{p.suffix or '(none)'}'; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))}")
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder, not a file name")
    if not p.parent.is_dir():
        raise UsageError(f"{flag} {path}: folder {p.parent} does not exist")


OUTCOMES = ("ok", "converted", "skipped")  # the manifest's statuses, in the order they are plotted
_CLASS_NAMES_SHOWN = 30  # up to this many classes, the class axis is labelled with their names


def _model_name(model: dict[str, Any]) -> str:
    return str(model.get("id") or model.get("timm_id") or "?")


def plot_title(s: dict[str, Any]) -> str:
    """The cache's folder name, its VAE and teachers, and a marker when any is a tiny random-init
    preset (whose numbers mean nothing about real models)."""
    groups = s["groups"]
    name = os.path.basename(str(s["path"]).rstrip("/")) or str(s["path"])
    parts = [f"cache {name}"]
    if "latents" in groups:
        parts.append(f"VAE {_model_name(groups['latents']['model'])}")
    teachers = [f"{g.split('/', 1)[-1]} ({_model_name(v['model'])})" for g, v in groups.items() if v["kind"] != "latents"]
    if teachers:
        parts.append(f"teacher{'s' if len(teachers) > 1 else ''} {', '.join(teachers)}")
    title = "  |  ".join(parts)
    if any(v["model"].get("tiny") for v in groups.values()):
        title += "  [TINY random-init preset]"
    return title


def stats_figure(s: dict[str, Any]) -> Figure:
    """The figure of :func:`cache_stats` (run with ``with_histograms=True``), one panel each for:
    the latent values of each latents group, one histogram per channel; the patch and CLS token
    L2 norms of each teacher; the outcome counts of the manifest; the valid samples per class."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    hists = s.get("_histograms", {})
    outcomes = s.get("outcomes") if isinstance(s.get("outcomes"), dict) else None
    per_class = s.get("per_class") or {}
    n_panels = len(hists) + (outcomes is not None) + bool(per_class)
    ncols = 2 if n_panels in (2, 4) else max(1, min(3, n_panels))
    nrows = max(1, -(-n_panels // ncols))
    fig = Figure(figsize=(5.5 * ncols, 4.0 * nrows + 0.6), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in grid[n_panels:]:
        fig.delaxes(ax)
    axes = iter(grid[:n_panels])
    for group, h in hists.items():
        ax = next(axes)
        n = h["samples"]  # the histograms read a prefix of the statistics' samples
        if "channels" in h:
            channels = np.asarray(h["channels"], dtype=np.float64)  # (C, values)
            for c, values in enumerate(channels):
                ax.hist(values, bins=60, histtype="step", linewidth=1.2, label=f"ch {c}")
            ax.set_title(f"{group}: latent mean per channel ({n} samples)", fontsize=9)
            ax.set_xlabel("latent value (VAE scale, before scale/shift)")
            ax.set_ylabel("values per bin")
            ax.legend(fontsize=7, ncol=min(4, len(channels)))
        else:
            ax.hist(np.asarray(h["patch"], dtype=np.float64), bins=60, density=True, alpha=0.7, label="patch tokens")
            ax.hist(np.asarray(h["cls"], dtype=np.float64), bins=30, density=True, alpha=0.7, label="CLS token")
            ax.set_title(f"{group}: token L2 norms ({n} samples)", fontsize=9)
            ax.set_xlabel("token L2 norm")
            ax.set_ylabel("density")
            ax.legend(fontsize=7)
    if outcomes is not None:
        ax = next(axes)
        kinds = list(OUTCOMES) + sorted(set(outcomes) - set(OUTCOMES))
        counts = [int(outcomes.get(k, 0)) for k in kinds]
        bars = ax.bar(kinds, counts, color=["#3b8a4a", "#c9a227", "#b03a2e"] + ["#777777"] * (len(kinds) - len(OUTCOMES)))
        ax.bar_label(bars, fontsize=8)
        ax.set_title(f"outcomes ({sum(counts)} inputs)", fontsize=9)
        ax.set_xlabel("outcome")
        ax.set_ylabel("inputs")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if per_class:
        ax = next(axes)
        names, counts = list(per_class), list(per_class.values())
        ax.bar(range(len(counts)), counts, color="#a55b3b")
        if len(names) <= _CLASS_NAMES_SHOWN:
            ax.set_xticks(range(len(names)), names, rotation=0 if len(names) <= 8 else 90, fontsize=8 if len(names) <= 8 else 7)
            ax.set_xlabel("class")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("class index")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"valid samples per class ({len(names)} classes, {min(counts)} to {max(counts)})", fontsize=9)
        ax.set_ylabel("valid samples")
    fig.suptitle(plot_title(s), fontsize=10)
    return fig


def plot_stats(s: dict[str, Any], path: str | Path) -> Path:
    """Write :func:`stats_figure` to ``path`` (its type from the extension: .png, .pdf, .svg, ...);
    returns the path."""
    check_plot_path(path)
    stats_figure(s).savefig(path, dpi=100)
    return Path(path)
