"""``repa fid``: Fréchet distances between generated and reference images.

* **FID**: pool3 features (2048-d) of the TensorFlow Inception-v3 used by the ADM evaluation
  suite, through torch-fidelity's port of it (``inception-v3-compat``); Inception is not
  re-implemented here. An ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``) carries the
  reference ``mu``/``sigma`` itself; those are used as they are, so the numbers compare with the
  published ones.
* **FD-DINOv2**: the same distance on the CLS token of a DINOv2 teacher from
  :mod:`stages.teachers` (ViT-L/14 by default, as in Stein et al. 2023), preprocessed as the
  teacher registry says (bicubic resize to 224 px for 256 px images, ImageNet mean/std).

Image sources are an npz with ``arr_0`` uint8 (N, H, W, 3) (streamed, never loaded whole) or a
folder of image files. Reference statistics are computed once and cached as an npz with ``mu``,
``sigma``, ``num`` and ``extractor``, keyed by the reference's path, size and modification time.
Any callable ``uint8 (B, 3, H, W) -> (B, D)`` with a ``name`` can stand in for the extractors
(tests use a small one).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from repa_cache.cache.errors import UsageError
from repa_cache.cache.storage import atomic_file
from repa_cache.eval.config import FidConfig
from repa_cache.eval.sample import IMAGES_DIR, iter_npz_batches, npz_array_info
from repa_cache.stages.devices import resolve_device

logger = logging.getLogger(__name__)

INCEPTION_NAME = "inception-v3-compat-pool3"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth")
DEFAULT_DINOV2 = FidConfig.dinov2_teacher
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class FeatureExtractor(Protocol):
    """Maps uint8 images (B, 3, H, W) to float features (B, D); ``name`` keys cached statistics."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


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


def compute_stats(source: str | Path, extractor: FeatureExtractor, batch_size: int = 50,
                  quiet: bool = False) -> FeatureStats:
    """Feature statistics of every image of ``source``."""
    moments = _Moments()
    total = count_images(source)
    bar = tqdm(total=total, unit="img", desc=f"features {extractor.name}",
               disable=quiet or not sys.stderr.isatty())
    for batch in iter_images(source, batch_size):
        images = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # (B, 3, H, W)
        with torch.no_grad():
            moments.add(extractor(images).detach().float().cpu().numpy())
        bar.update(len(batch))
    bar.close()
    return moments.stats(extractor.name)


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
    ``mu``/``sigma`` (Inception pool3 of the ADM suite, valid for FID only)."""
    if not path.is_file() or path.suffix != ".npz":
        return None
    try:
        with np.load(path) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                return None
            stored = str(f["extractor"]) if "extractor" in f.files else INCEPTION_NAME
            if stored != extractor.name:
                if "arr_0" in f.files:
                    return None  # compute from its images instead
                raise UsageError(f"{path} holds '{stored}' statistics, not '{extractor.name}' ones")
            num = int(f["num"]) if "num" in f.files else (npz_array_info(path)[0][0] if "arr_0" in f.files else 0)
            return FeatureStats(f["mu"], f["sigma"], int(num), stored)
    except UsageError:
        raise
    except Exception:  # noqa: BLE001 - not an npz we can read: iter_images will say why
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
    folder = Path(stats_dir) if stats_dir is not None else _default_stats_dir()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{path.resolve().name}-{extractor.name}")
    cached = folder / f"{safe}-{_source_key(path)}.npz"
    if cached.is_file():
        stats = FeatureStats.load(cached)
        if stats.extractor == extractor.name:
            logger.info("reference statistics from %s", cached)
            return stats, cached
    stats = compute_stats(path, extractor, batch_size, quiet)
    try:
        stats.save(cached)
    except OSError as e:
        logger.warning("could not cache the reference statistics in %s: %s", cached, e)
        return stats, None
    return stats, cached


# --------------------------------------------------------------------------------------------
# extractors


class InceptionExtractor:
    """torch-fidelity's port of the TF Inception-v3 of the ADM suite: pool3 features (2048-d)."""

    name = INCEPTION_NAME

    def __init__(self, net: torch.nn.Module, device: torch.device) -> None:
        self.net, self.device = net.to(device), device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        (features,) = self.net(images.to(self.device))  # resizes to 299 itself, like TF
        return features


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
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=None if weights is None else str(weights))
    except Exception as e:  # offline download, unreadable file: one message
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot load the FID Inception weights ({reason}); without network, fetch {INCEPTION_WEIGHTS_URL} "
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
            self._models[h] = load_teacher(self.spec, h, self.device, pretrained=True, checkpoint=self.checkpoint)
        _, cls = encode_images(self._models[h], self.spec, images, h)
        return cls  # (B, D)


def dinov2_extractor(teacher: str = DEFAULT_DINOV2, device: torch.device | str = "cpu",
                     checkpoint: str | None = None) -> DinoV2Extractor:
    """FD-DINOv2 features: the CLS token of a registry teacher (weights loaded on first use)."""
    return DinoV2Extractor(teacher, device, checkpoint)


# --------------------------------------------------------------------------------------------
# the command


def fid(
    samples: str | Path,
    ref: str | Path,
    cfg: FidConfig | None = None,
    *,
    extractors: Mapping[str, FeatureExtractor] | None = None,
) -> dict[str, Any]:
    """FID (and FD-DINOv2) of ``samples`` against ``ref``; each an npz or a folder of images.

    Args:
        samples: generated images (``repa sample``'s npz, or its folder).
        ref: reference images or statistics (an ADM reference batch, our stats npz, a folder).
        cfg: the job's settings (default: :class:`FidConfig`'s: FID alone, weights downloaded by
            torch-fidelity).
        extractors: metric name -> extractor, replacing the default ones (for tests and custom
            metrics); the result then has one entry per name.

    Returns:
        ``{"fid": ..., "fd_dinov2": ..., "num_samples": ..., "num_ref": {...}, "ref_stats": {...}}``.
    """
    cfg = cfg if cfg is not None else FidConfig()
    batch_size, quiet = cfg.batch_size, cfg.quiet
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    for name, p in (("samples", samples), ("reference", ref)):
        if not Path(p).exists():
            raise UsageError(f"no such {name} npz or image folder: {p}")
    if extractors is None:
        dev = resolve_device(cfg.device)
        chosen: dict[str, FeatureExtractor] = {"fid": inception_extractor(cfg.inception_weights, dev)}
        if cfg.fd_dinov2:
            chosen["fd_dinov2"] = dinov2_extractor(cfg.dinov2_teacher, dev, cfg.dinov2_checkpoint)
    else:
        chosen = dict(extractors)
    result: dict[str, Any] = {"samples": str(samples), "ref": str(ref), "num_ref": {}, "ref_stats": {}}
    for metric, extractor in chosen.items():
        ref_stats, ref_file = reference_stats(ref, extractor, cfg.stats_dir, batch_size, quiet)
        stats = compute_stats(samples, extractor, batch_size, quiet)
        if ref_stats.mu.shape != stats.mu.shape:
            raise UsageError(f"{metric}: the reference statistics have {ref_stats.mu.shape[0]} dims, "
                             f"the samples' features {stats.mu.shape[0]}")
        result[metric] = frechet_distance(stats.mu, stats.sigma, ref_stats.mu, ref_stats.sigma)
        result["num_samples"] = stats.num
        result["num_ref"][metric] = ref_stats.num
        result["ref_stats"][metric] = str(ref_file) if ref_file else None
        logger.info("%s = %.4f (%d samples, %d reference)", metric, result[metric], stats.num, ref_stats.num)
    return result
