"""``repa evaluate`` (also ``repa fid``): distances and scores between generated and reference images.

* **FID**: pool3 features (2048-d) of the TensorFlow Inception-v3 used by the ADM evaluation
  suite, through torch-fidelity's port of it (``inception-v3-compat``); Inception is not
  re-implemented here. An ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``) carries the
  reference ``mu``/``sigma`` itself; those are used as they are, so the numbers compare with the
  published ones.
* **IS**, **precision / recall** and **KID** on the same network, computed by torch-fidelity's own
  functions from the features gathered here: IS on the 1008 unbiased logits of the samples
  (10 splits); precision and recall (Kynkäänniemi et al. 2019, k = 3) and KID (unbiased MMD² with
  the kernel ``(x·y / d + 1)³``, 100 subsets of 1000) on the pool3 features, against the
  reference images' features — for an ADM reference batch, its 10 000 images, as ADM does.
* **FD-DINOv2**: the Fréchet distance on the CLS token of a DINOv2 teacher from
  :mod:`stages.teachers` (ViT-L/14 by default, as in Stein et al. 2023), preprocessed as the
  teacher registry says (bicubic resize to 224 px for 256 px images, ImageNet mean/std).

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
from typing import Any, Protocol, cast

import numpy as np
import torch
from PIL import Image

from repa_cache.cache.errors import RepaError, UsageError
from repa_cache.cache.progress import Progress
from repa_cache.cache.storage import atomic_file
from repa_cache.eval.config import FidConfig
from repa_cache.eval.sample import IMAGES_DIR, iter_npz_batches, npz_array_info
from repa_cache.stages.devices import resolve_device

logger = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat-pool3"
#: sFID's features: ADM's ``mixed_6/conv`` (the 1x1 branch of Mixed_6d), first 7 of its 192
#: channels on the 17x17 map, flattened channels-last as ADM's evaluator does: 2023 dims
SPATIAL_NAME = "inception-v3-compat-mixed6-conv-7ch"
#: the statistics an ADM reference batch stores for each Inception feature
ADM_STATS = {INCEPTION_NAME: ("mu", "sigma"), SPATIAL_NAME: ("mu_s", "sigma_s")}
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth")
DEFAULT_DINOV2 = FidConfig.dinov2_teacher
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FeatureExtractor(Protocol):
    """Maps uint8 images (B, 3, H, W) to float features (B, D); ``name`` keys cached statistics."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class ClassifierExtractor(FeatureExtractor, Protocol):
    """An extractor that is also a classifier: the Inception Score needs its logits."""

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> (features (B, D), logits (B, C)) from one forward pass."""
        ...


# --------------------------------------------------------------------------------------------
# the distance


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))`` with the matrix
    square root from ``scipy.linalg.sqrtm``. When the product is singular enough that the root is
    not finite, ``eps`` is added to both diagonals; a tiny imaginary part from rounding is dropped.
    """
    try:
        import scipy.linalg
    except ImportError:
        raise UsageError("the Fréchet distance needs scipy, which is not installed: pip install 'repa-cache[eval]'") from None
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shapes do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        logger.warning("singular product of covariances; adding %g to the diagonals", eps)
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"the matrix square root has a large imaginary part ({imag:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


@dataclass
class FeatureStats:
    """Mean and covariance of features of ``num`` images under extractor ``extractor``."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int
    extractor: str

    @classmethod
    def from_features(cls, features: np.ndarray, extractor: str) -> FeatureStats:
        feats = np.asarray(features, np.float64)
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False), len(feats), extractor)

    def save(self, path: Path) -> Path:
        """Write ``mu``, ``sigma``, ``num`` and ``extractor`` to an npz; it appears whole or not at all."""
        with atomic_file(path) as f:
            np.savez(f, mu=self.mu, sigma=self.sigma, num=np.int64(self.num), extractor=np.str_(self.extractor))
        return path

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        with np.load(path) as f:
            return cls(f["mu"], f["sigma"], int(f["num"]), str(f["extractor"]))


class _Moments:
    """Streaming sums for the mean and covariance (float64)."""

    def __init__(self) -> None:
        self.n = 0
        self.s1: np.ndarray | None = None
        self.s2: np.ndarray | None = None

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64)  # (B, D)
        if self.s1 is None:
            self.s1, self.s2 = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += len(f)
        self.s1 += f.sum(axis=0)
        self.s2 += f.T @ f

    def stats(self, extractor: str) -> FeatureStats:
        if self.n < 2 or self.s1 is None or self.s2 is None:
            raise UsageError(f"a Fréchet distance needs at least 2 images, got {self.n}")
        mu = self.s1 / self.n
        sigma = (self.s2 - self.n * np.outer(mu, mu)) / (self.n - 1)
        return FeatureStats(mu, (sigma + sigma.T) / 2, self.n, extractor)


def _torch_fidelity(module: str) -> Any:
    """A torch-fidelity module, or a UsageError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(f"torch_fidelity.{module}")
    except ImportError:
        raise UsageError("IS, precision/recall and KID need torch-fidelity, which is not installed: "
                         "pip install 'repa-cache[eval]'") from None


def inception_score(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` per split of the (shuffled) samples: (mean, std) over splits.

    ``p(y|x)`` is the softmax of a sample's logits and ``p(y)`` the mean of ``p(y|x)`` over its
    split; torch-fidelity's ``isc_features_to_metric`` does the work (the shuffle is seeded).

    Args:
        logits: (N, C) classifier logits of the samples.
    """
    if splits < 1 or len(logits) < splits:
        raise UsageError(f"the Inception Score needs at least one sample per split: {len(logits)} samples, {splits} splits")
    isc = _torch_fidelity("metric_isc")
    out = isc.isc_features_to_metric(torch.from_numpy(np.asarray(logits)), splits, True, seed)
    return float(out[isc.KEY_METRIC_ISC_MEAN]), float(out[isc.KEY_METRIC_ISC_STD])


def precision_recall(samples: np.ndarray, reference: np.ndarray, k: int = 3,
                     device: torch.device | str = "cpu", batch_size: int = 10_000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of feature sets.

    Each point of a set owns the ball reaching its k-th nearest neighbour within that set (itself
    excluded). Precision: the fraction of samples inside some reference ball; recall: the fraction
    of reference points inside some sample ball. torch-fidelity's batched
    ``calculate_precision_recall_part`` computes both (Euclidean distances, ``<=`` on the radius).

    Args:
        samples: (N, D) features of the generated images.
        reference: (M, D) features of the reference images.
    """
    if k < 1 or min(len(samples), len(reference)) <= k:
        raise UsageError(f"precision/recall with k={k} needs more than {k} samples and reference images, "
                         f"got {len(samples)} and {len(reference)}")
    prc = _torch_fidelity("metric_prc")
    gen = torch.from_numpy(np.asarray(samples, np.float32)).to(device)  # (N, D)
    real = torch.from_numpy(np.asarray(reference, np.float32)).to(device)  # (M, D)
    precision, recall = prc.calculate_precision_recall_part(gen, real, k, batch_size)
    return float(precision), float(recall)


def kernel_inception_distance(samples: np.ndarray, reference: np.ndarray, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 2020) -> tuple[float, float, int]:
    """KID (Bińkowski et al. 2018): the unbiased MMD² estimate with the polynomial kernel
    ``k(x, y) = (x·y / d + 1)³`` on random equal-size subsets of both sets: (mean, std, subset size).

    Subsets are drawn without replacement (seeded) by torch-fidelity's ``kid_features_to_metric``;
    the subset size is lowered to the smaller set's size when a set is smaller.
    """
    size = min(subset_size, len(samples), len(reference))
    if subsets < 1 or size < 2:
        raise UsageError(f"KID needs at least 2 samples and 2 reference images and one subset, got "
                         f"{len(samples)}, {len(reference)} and {subsets} subsets")
    kid = _torch_fidelity("metric_kid")
    out = kid.kid_features_to_metric(
        torch.from_numpy(np.asarray(samples, np.float64)), torch.from_numpy(np.asarray(reference, np.float64)),
        kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False, kid_kernel="poly",
        kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    return float(out[kid.KEY_METRIC_KID_MEAN]), float(out[kid.KEY_METRIC_KID_STD]), size


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
    except Exception as e:  # not a zip, not an npy member
        raise UsageError(f"{path} is not an npz file or an image folder ({e})") from e
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise UsageError(f"{path}: arr_0 must be uint8 (N, H, W, 3) images, got {dtype} {shape}")
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
    moments = _Moments()
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
# extractors


class InceptionExtractor:
    """torch-fidelity's port of the TF Inception-v3 of the ADM suite: pool3 features (2048-d) and
    the 1008 logits without bias (``logits_unbiased``, what torch-fidelity's IS uses)."""

    name = INCEPTION_NAME

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        self.net, self.device = net.to(device), device
        self.last_spatial: torch.Tensor | None = None  # sFID's features of the last batch
        branch = net.get_submodule("Mixed_6d.branch1x1")  # ADM's mixed_6/conv
        branch.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # ADM takes mixed_6/conv:0 (after its ReLU) as NHWC, keeps channels [:7] and flattens
        self.last_spatial = output[:, :7].permute(0, 2, 3, 1).reshape(len(output), -1).clone()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.net(images.to(self.device))  # resizes to 299 itself, like TF
        return features, logits  # (B, 2048), (B, 1008)

    def spatial(self) -> SpatialExtractor:
        """The sFID extractor on this network."""
        return SpatialExtractor(self)


class SpatialExtractor:
    """sFID's features (:data:`SPATIAL_NAME`, 2023-d) from an :class:`InceptionExtractor`'s network."""

    name = SPATIAL_NAME

    def __init__(self, inception: InceptionExtractor) -> None:
        self.inception = inception

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.inception.features_and_logits(images)
        assert self.inception.last_spatial is not None
        return self.inception.last_spatial  # (B, 7 * 17 * 17)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def inception_extractor(weights: str | Path | None = None, device: torch.device | str = "cpu") -> InceptionExtractor:
    """The FID Inception network, from a local weights file or torch-fidelity's own download.

    Raises:
        UsageError: torch-fidelity is not installed, the file is missing, or the weights cannot be
            fetched (no network) — with what to do about it.
    """
    if weights is not None and not Path(weights).is_file():
        raise UsageError(f"no Inception weights file at {weights}")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError:
        raise UsageError("FID needs torch-fidelity, which is not installed: pip install 'repa-cache[eval]'") from None
    if weights is not None:
        try:  # torch-fidelity unpickles the file freely: admit only a plain state dict
            torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"{weights} is not a plain weights file (state dict of tensors): {_first_line(e)}") from e
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=None if weights is None else str(weights))
    except Exception as e:  # offline download, unreadable file: one message
        raise UsageError(
            f"cannot load the FID Inception weights ({_first_line(e)}); without network, fetch {INCEPTION_WEIGHTS_URL} "
            "elsewhere and pass it with --inception-weights FILE") from e
    return InceptionExtractor(net, torch.device(device))


class DinoV2Extractor:
    """CLS token of a registry teacher (DINOv2 ViT-L/14 by default), built for the image size."""

    def __init__(self, teacher: str = DEFAULT_DINOV2, device: torch.device | str = "cpu",
                 checkpoint: str | None = None) -> None:
        from repa_cache.stages.teachers import get_teacher

        self.spec = get_teacher(teacher)
        self.device, self.checkpoint = torch.device(device), checkpoint
        self.name = f"{teacher}-cls"
        self._models: dict[int, torch.nn.Module] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from repa_cache.stages.teachers import encode_images, load_teacher

        h, w = images.shape[-2:]
        if h != w:
            raise UsageError(f"FD-DINOv2 needs square images, got {w}x{h}")
        if h not in self._models:
            self._models[h] = load_teacher(self.spec, h, self.device, pretrained=True, checkpoint=self.checkpoint,
                                           checkpoint_option="--dinov2-checkpoint FILE")
        _, cls = encode_images(self._models[h], self.spec, images, h)
        return cls  # (B, D)


def dinov2_extractor(teacher: str = DEFAULT_DINOV2, device: torch.device | str = "cpu",
                     checkpoint: str | None = None) -> DinoV2Extractor:
    """FD-DINOv2 features: the CLS token of a registry teacher (weights loaded on first use)."""
    return DinoV2Extractor(teacher, device, checkpoint)


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
