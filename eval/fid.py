"""``repa evaluate`` (also ``repa fid``): distances and scores between generated and reference images.

* **FID**: pool3 features (2048-d) of the TensorFlow Inception-v3 used by the ADM evaluation
  suite, through torch-fidelity's port of it (``inception-v3-compat``); Inception is not
  re-implemented here. An ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``) carries the
  reference ``mu``/``sigma`` itself; those are used as they are, so the numbers compare with the
  published ones. **sFID** likewise on ADM's spatial features (``mu_s``/``sigma_s``).
* **IS**, **precision / recall** and **KID** on the same network, computed by torch-fidelity's own
  functions from the features gathered here: IS on the 1008 unbiased logits of the samples
  (10 splits); precision and recall (Kynkäänniemi et al. 2019, k = 3) and KID (unbiased MMD² with
  the kernel ``(x·y / d + 1)³``, 100 subsets of 1000) on the pool3 features, against the
  reference images' features — for an ADM reference batch, its 10 000 images, as ADM does.
* **FD-DINOv2**: the Fréchet distance on the CLS token of a DINOv2 teacher from
  :mod:`stages.teachers` (ViT-L/14 by default, as in Stein et al. 2023), preprocessed as the
  teacher registry says (bicubic resize to 224 px for 256 px images, ImageNet mean/std).

The networks are in :mod:`eval.extractors`, the formulas in :mod:`eval.metrics`; this module
reads the images, caches the reference's statistics and runs the job.

Image sources are an npz with ``arr_0`` uint8 (N, H, W, 3) (streamed, never loaded whole) or a
folder of image files. Reference statistics are computed once and cached as an npz with ``mu``,
``sigma``, ``num`` and ``extractor``, and reference features (for precision/recall and KID) as an
npz with ``features``, ``num`` and ``extractor``, keyed by the reference's path, size and
modification time. Any callable ``uint8 (B, 3, H, W) -> (B, D)`` with a ``name`` can stand in for
the extractors (tests use a small one); one that also has ``features_and_logits`` gives IS.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from repa_cache.cache.errors import RepaError, UsageError, one_line
from repa_cache.cache.progress import Progress
from repa_cache.cache.storage import atomic_file
from repa_cache.eval.config import FidConfig
from repa_cache.eval.extractors import (
    ADM_STATS,
    INCEPTION_NAME,
    SPATIAL_NAME,
    ClassifierExtractor,
    FeatureExtractor,
    dinov2_extractor,
    inception_extractor,
)
from repa_cache.eval.images import MAX_IMAGE_SIDE, iter_npz_batches, npz_array_info
from repa_cache.eval.metrics import FeatureStats, Moments, frechet_distance, inception_score, kernel_inception_distance, precision_recall
from repa_cache.eval.sample import IMAGES_DIR
from repa_cache.stages.devices import resolve_device

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------------
# image sources


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files and (folder / IMAGES_DIR).is_dir():  # the output folder of `repa sample`
        return _image_files(folder / IMAGES_DIR)
    return files


def _npz_images(path: Path) -> tuple[int, ...]:
    """Shape of the ``arr_0`` images of an npz, or a UsageError saying why it is not usable."""
    if not path.is_file():
        raise UsageError(f"no such npz file or image folder: {path}")
    try:
        shape, dtype = npz_array_info(path)
    except KeyError:
        raise UsageError(f"{path} has no 'arr_0' array of images") from None
    except UsageError:
        raise
    except Exception as e:  # not a zip, not an npy member
        raise UsageError(f"{path} is not an npz file or an image folder ({one_line(e)})") from e
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise UsageError(f"{path}: arr_0 must be uint8 (N, H, W, 3) images, got {dtype} {shape}")
    if not (1 <= shape[1] <= MAX_IMAGE_SIDE and 1 <= shape[2] <= MAX_IMAGE_SIDE):
        raise UsageError(f"{path}: arr_0 holds {shape[2]}x{shape[1]} images; evaluation reads sides of 1 to {MAX_IMAGE_SIDE}")
    return shape


def count_images(source: str | Path) -> int:
    """Number of images in an npz (``arr_0``) or a folder."""
    path = Path(source)
    return len(_image_files(path)) if path.is_dir() else _npz_images(path)[0]


def iter_images(source: str | Path, batch_size: int = 50) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, 3) batches of an npz (``arr_0``) or of the image files of a folder.

    Raises:
        UsageError: no such source, no images in it, images of different sizes, a bad npz layout.
    """
    path = Path(source)
    if not path.is_dir():
        _npz_images(path)
        yield from iter_npz_batches(path, batch_size)
        return
    files = _image_files(path)
    if not files:
        raise UsageError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    first: tuple[int, ...] | None = None
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = [np.asarray(Image.open(p).convert("RGB")) for p in chunk]
        for p, img in zip(chunk, batch):
            first = first or img.shape
            if img.shape != first:
                raise UsageError(f"{p} is {img.shape[1]}x{img.shape[0]} but the first image is "
                                 f"{first[1]}x{first[0]}; all images must have one size")
        yield np.stack(batch)


@dataclass
class Extracted:
    """What one pass of an extractor over a source gives."""

    stats: FeatureStats  # of every image
    features: np.ndarray | None  # (n, D) float32 of the first ``keep`` images, when asked for
    logits: np.ndarray | None  # (N, C) float32 of every image, when asked for


def extract(source: str | Path, extractor: FeatureExtractor, batch_size: int = 50, quiet: bool = False,
            keep: int = 0, logits: bool = False) -> Extracted:
    """One pass over ``source``: feature statistics of every image, the features of the first
    ``keep`` images and, with ``logits``, every image's logits (the extractor must have
    ``features_and_logits``)."""
    moments = Moments()
    kept: list[np.ndarray] = []
    all_logits: list[np.ndarray] = []
    n_kept = 0
    total = count_images(source)
    bar = Progress(total, f"features {extractor.name}", "img", quiet=quiet)
    for batch in iter_images(source, batch_size):
        images = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # (B, 3, H, W)
        with torch.no_grad():
            if logits:
                feats, lg = cast(ClassifierExtractor, extractor).features_and_logits(images)  # (B, D), (B, C)
                all_logits.append(lg.detach().float().cpu().numpy())
            else:
                feats = extractor(images)  # (B, D)
        f = feats.detach().float().cpu().numpy()
        moments.add(f)
        if n_kept < keep:
            kept.append(f[:keep - n_kept])
            n_kept += len(kept[-1])
        bar.update(len(batch))
    bar.close()
    return Extracted(moments.stats(extractor.name), np.concatenate(kept) if kept else None,
                     np.concatenate(all_logits) if all_logits else None)


def compute_stats(source: str | Path, extractor: FeatureExtractor, batch_size: int = 50,
                  quiet: bool = False) -> FeatureStats:
    """Feature statistics of every image of ``source``."""
    return extract(source, extractor, batch_size, quiet).stats


def _default_stats_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "repa-cache" / "fid-stats"


def _source_key(path: Path) -> str:
    """Identity of a reference: its path, size and modification time (per file for a folder)."""
    path = path.resolve()
    h = hashlib.sha256(str(path).encode())
    if path.is_dir():
        for p in _image_files(path):
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        st = path.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _stored_stats(path: Path, extractor: FeatureExtractor) -> FeatureStats | None:
    """Statistics stored in an npz reference: our own stats file, or an ADM reference batch's
    ``mu``/``sigma`` (Inception pool3, for FID) and ``mu_s``/``sigma_s`` (for sFID)."""
    if not path.is_file() or path.suffix != ".npz":
        return None
    try:
        with np.load(path) as f:
            if "extractor" in f.files:  # our statistics file
                stored, keys = str(f["extractor"]), ("mu", "sigma")
            elif all(k in f.files for k in ADM_STATS.get(extractor.name, ("",))):
                stored, keys = extractor.name, ADM_STATS[extractor.name]
            else:
                stored, keys = INCEPTION_NAME, ("mu", "sigma")
            if not all(k in f.files for k in keys):
                return None
            if stored != extractor.name:
                if "arr_0" in f.files:
                    return None  # compute from its images instead
                raise UsageError(f"{path} holds '{stored}' statistics, not '{extractor.name}' ones")
            num = int(f["num"]) if "num" in f.files else (npz_array_info(path)[0][0] if "arr_0" in f.files else 0)
            return FeatureStats(f[keys[0]], f[keys[1]], int(num), stored)
    except UsageError:
        raise
    except Exception:  # noqa: BLE001 - not an npz we can read: iter_images will say why
        return None


def _cache_base(path: Path, extractor: FeatureExtractor, stats_dir: str | Path | None) -> Path:
    """Cache file stem of a reference under an extractor: name, extractor and identity."""
    folder = Path(stats_dir) if stats_dir is not None else _default_stats_dir()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{path.resolve().name}-{extractor.name}")
    return folder / f"{safe}-{_source_key(path)}"


def _save_cached(save: Any, target: Path, what: str) -> Path | None:
    """Write a cache file; a cache that cannot be written only costs a recomputation next time."""
    try:
        return cast(Path, save(target))
    except OSError as e:
        logger.warning("could not cache the reference %s in %s: %s", what, target, e)
        return None


def reference_stats(ref: str | Path, extractor: FeatureExtractor, stats_dir: str | Path | None = None,
                    batch_size: int = 50, quiet: bool = False) -> tuple[FeatureStats, Path | None]:
    """Statistics of the reference set, computed once and cached.

    Returns ``(stats, file)``: ``file`` is the cache file (or the reference itself when it carries
    the statistics).
    """
    path = Path(ref)
    if not path.exists():
        raise UsageError(f"no such reference npz or image folder: {path}")
    stored = _stored_stats(path, extractor)
    if stored is not None:
        return stored, path
    cached = _cache_base(path, extractor, stats_dir).with_suffix(".npz")
    if cached.is_file():
        stats = FeatureStats.load(cached)
        if stats.extractor == extractor.name:
            logger.info("reference statistics from %s", cached)
            return stats, cached
    stats = compute_stats(path, extractor, batch_size, quiet)
    return stats, _save_cached(stats.save, cached, "statistics")


def has_images(ref: str | Path) -> bool:
    """Whether a reference holds images (a folder, an npz with ``arr_0``), not only statistics."""
    path = Path(ref)
    if path.is_dir():
        return True
    try:
        with np.load(path) as f:
            return "arr_0" in f.files or not {"mu", "sigma"} <= set(f.files)
    except Exception:  # noqa: BLE001 - not an npz: iter_images says why
        return True


def reference_features(ref: str | Path, extractor: FeatureExtractor, stats_dir: str | Path | None = None,
                       batch_size: int = 50, quiet: bool = False,
                       max_images: int = 50_000) -> tuple[np.ndarray, Path | None]:
    """Features (n, D) float32 of the first ``max_images`` reference images, computed once and
    cached (``features``, ``num``, ``extractor`` in an npz next to the statistics).

    The pass also gives the statistics of every image; they are cached too when they are not yet,
    so the first evaluation reads the reference once.

    Returns ``(features, file)``: ``file`` is the cache file (None when it could not be written).

    Raises:
        UsageError: the reference holds statistics only (no images to take features of).
    """
    path = Path(ref)
    if not path.exists():
        raise UsageError(f"no such reference npz or image folder: {path}")
    if max_images < 2:
        raise UsageError(f"--max-ref-images must be at least 2, got {max_images}")
    if not has_images(path):
        raise UsageError(f"{path} holds statistics only; precision/recall and KID need reference images")
    base = _cache_base(path, extractor, stats_dir)
    cached = base.parent / f"{base.name}-features{max_images}.npz"
    if cached.is_file():
        with np.load(cached) as f:
            if str(f["extractor"]) == extractor.name:
                logger.info("reference features from %s", cached)
                return np.asarray(f["features"], np.float32), cached
    got = extract(path, extractor, batch_size, quiet, keep=max_images)
    assert got.features is not None  # keep >= 2 and at least 2 images (else extract raised)
    stats_file = base.with_suffix(".npz")
    if _stored_stats(path, extractor) is None and not stats_file.is_file():
        _save_cached(got.stats.save, stats_file, "statistics")
    features = got.features.astype(np.float32)

    def save(target: Path) -> Path:
        with atomic_file(target) as f:
            np.savez(f, features=features, num=np.int64(len(features)), extractor=np.str_(extractor.name))
        return target

    return features, _save_cached(save, cached, "features")


# --------------------------------------------------------------------------------------------
# the command


def _definitions(cfg: FidConfig, chosen: Mapping[str, FeatureExtractor], result: Mapping[str, Any]) -> dict[str, str]:
    """What each number of ``result`` is, in one line each, with the parameters it was computed with."""

    def features(ext: FeatureExtractor) -> str:
        return {INCEPTION_NAME: "Inception-v3 pool3 features (2048-d, ADM's TF network)",
                SPATIAL_NAME: "Inception-v3 mixed_6/conv features, first 7 channels of the 17x17 map (2023-d, ADM's sFID)",
                }.get(ext.name, f"'{ext.name}' features")

    defs: dict[str, str] = {}
    for metric, ext in chosen.items():
        if metric not in result:  # failed
            continue
        on = f"the CLS token of teacher '{ext.name.removesuffix('-cls')}'" if metric == "fd_dinov2" else features(ext)
        defs[metric] = f"|mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2)): Fréchet distance of Gaussians fit to {on}"
    if "fid" not in result:
        return defs
    on = features(chosen["fid"])
    if "is" in result:
        classifier = "Inception" if chosen["fid"].name == INCEPTION_NAME else f"'{chosen['fid'].name}'"
        defs["is"] = (f"exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax of the samples' {result['is_classes']} {classifier} "
                      f"logits, p(y) its mean per split; mean over {cfg.is_splits} splits (is_std: their std)")
    if "precision" in result:
        defs["precision"] = (f"fraction of samples within the {cfg.pr_k}-NN radius of some reference image "
                             f"(Kynkäänniemi et al. 2019) on {on}")
        defs["recall"] = f"fraction of reference images within the {cfg.pr_k}-NN radius of some sample, on {on}"
    if "kid" in result:
        defs["kid"] = (f"unbiased MMD^2 with kernel (x.y/d + 1)^3 on {on}, mean over {cfg.kid_subsets} random "
                       f"subsets of {result['kid_subset_size']} samples and {result['kid_subset_size']} reference "
                       "images (kid_std: their std)")
    return defs


def _check_cfg(cfg: FidConfig) -> None:
    for name, value, least in (("--batch-size", cfg.batch_size, 1), ("--is-splits", cfg.is_splits, 1),
                               ("--pr-k", cfg.pr_k, 1), ("--kid-subsets", cfg.kid_subsets, 1),
                               ("--kid-subset-size", cfg.kid_subset_size, 2), ("--max-ref-images", cfg.max_ref_images, 2)):
        if value < least:
            raise UsageError(f"{name} must be at least {least}, got {value}")


def fid(
    samples: str | Path,
    ref: str | Path,
    cfg: FidConfig | None = None,
    *,
    extractors: Mapping[str, FeatureExtractor] | None = None,
) -> dict[str, Any]:
    """FID, IS, precision/recall, KID (and FD-DINOv2) of ``samples`` against ``ref``.

    Args:
        samples: generated images (``repa sample``'s npz, or its folder); an npz or a folder.
        ref: reference images or statistics (an ADM reference batch, our stats npz, a folder).
        cfg: the job's settings (default: :class:`FidConfig`'s).
        extractors: metric name -> extractor, replacing the default ones (for tests and custom
            metrics); each gives a Fréchet distance under its name, and the one named ``fid`` also
            gives IS (when it has ``features_and_logits``), precision/recall and KID as ``cfg`` asks.

    Returns:
        ``{"fid": ..., "sfid": ..., "is": ..., "precision": ..., "recall": ..., "kid": ..., "fd_dinov2": ...,
        "num_samples": ..., "num_ref": {...}, "ref_stats": {...}, "definitions": {...},
        "skipped": {...}}``: ``skipped`` says why an asked-for metric has no value (a reference of
        statistics only has no images for precision/recall and KID); ``failed`` (only when one
        did) gives the error of each metric that could not be computed while others were.

    Raises:
        RepaError: no metric could be computed.
    """
    cfg = cfg if cfg is not None else FidConfig()
    _check_cfg(cfg)
    batch_size, quiet = cfg.batch_size, cfg.quiet
    for name, p in (("samples", samples), ("reference", ref)):
        if not Path(p).exists():
            raise UsageError(f"no such {name} npz or image folder: {p}")
    for p in (samples, *((ref,) if has_images(ref) else ())):
        count_images(p)  # an npz's header is checked before any extractor loads
    dev = torch.device("cpu")
    result_skipped: dict[str, str] = {}
    if extractors is None:
        dev = resolve_device(cfg.device)
        inception = inception_extractor(cfg.inception_weights, dev)
        chosen: dict[str, FeatureExtractor] = {"fid": inception}
        if cfg.sfid and callable(getattr(inception, "spatial", None)):
            chosen["sfid"] = inception.spatial()
        elif cfg.sfid:
            result_skipped = {"sfid": f"the extractor '{inception.name}' gives no spatial features"}
        if cfg.fd_dinov2:
            chosen["fd_dinov2"] = dinov2_extractor(cfg.dinov2_teacher, dev, cfg.dinov2_checkpoint)
    else:
        chosen = dict(extractors)
    result: dict[str, Any] = {"samples": str(samples), "ref": str(ref), "num_ref": {}, "ref_stats": {}, "skipped": result_skipped}
    def measure(metric: str, extractor: FeatureExtractor) -> None:
        """Compute ``metric`` (and the extras of ``fid``) into ``result``."""
        extras = metric == "fid"
        want_is = extras and cfg.inception_score
        if want_is and not callable(getattr(extractor, "features_and_logits", None)):
            result["skipped"]["is"] = f"the extractor '{extractor.name}' gives no logits"
            want_is = False
        want_ref_feats = extras and (cfg.precision_recall or cfg.kid)
        if want_ref_feats and not has_images(ref):
            for m in (*(("precision", "recall") if cfg.precision_recall else ()), *(("kid",) if cfg.kid else ())):
                result["skipped"][m] = f"{ref} holds statistics only; it needs reference images"
            want_ref_feats = False
        ref_feats = None
        if want_ref_feats:  # first: this pass also caches the statistics
            ref_feats, feats_file = reference_features(ref, extractor, cfg.stats_dir, batch_size, quiet, cfg.max_ref_images)
            result["ref_features"] = str(feats_file) if feats_file else None
        ref_stats, ref_file = reference_stats(ref, extractor, cfg.stats_dir, batch_size, quiet)
        got = extract(samples, extractor, batch_size, quiet, keep=count_images(samples) if want_ref_feats else 0,
                      logits=want_is)
        stats = got.stats
        if ref_stats.mu.shape != stats.mu.shape:
            raise UsageError(f"{metric}: the reference statistics have {ref_stats.mu.shape[0]} dims, "
                             f"the samples' features {stats.mu.shape[0]}")
        result[metric] = frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma)
        result["num_samples"] = stats.num
        result["num_ref"][metric] = ref_stats.num
        result["ref_stats"][metric] = str(ref_file) if ref_file else None
        logger.info("%s = %.4f (%d samples, %d reference)", metric, result[metric], stats.num, ref_stats.num)
        if want_is and got.logits is not None:
            result["is"], result["is_std"] = inception_score(got.logits, cfg.is_splits, cfg.seed)
            result["is_classes"] = got.logits.shape[1]
        if ref_feats is not None and got.features is not None:
            result["num_ref_features"] = len(ref_feats)
            if cfg.precision_recall:
                result["precision"], result["recall"] = precision_recall(got.features, ref_feats, cfg.pr_k, dev)
            if cfg.kid:
                result["kid"], result["kid_std"], result["kid_subset_size"] = kernel_inception_distance(
                    got.features, ref_feats, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)

    errors: dict[str, RepaError] = {}
    for metric, extractor in chosen.items():
        try:
            measure(metric, extractor)
        except RepaError as e:  # the numbers already computed are kept, and the failure is reported with them
            errors[metric] = e
    if errors and not any(m in result for m in chosen):  # nothing computed: the failure is the answer
        if len(errors) == 1:
            raise next(iter(errors.values()))
        raise UsageError("; ".join(f"{m}: {e}" for m, e in errors.items()))
    if errors:
        result["failed"] = {m: str(e) for m, e in errors.items()}
    result["definitions"] = _definitions(cfg, chosen, result)
    return result
