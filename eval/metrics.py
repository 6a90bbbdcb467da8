"""The numbers of ``repa evaluate`` from features: the Fréchet distance (the ADM suite's formula,
with scipy's matrix square root), feature statistics gathered in one streaming pass, and the
Inception Score, precision/recall and KID through torch-fidelity's own functions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repa_cache.cache.errors import UsageError
from repa_cache.cache.storage import atomic_file

logger = logging.getLogger(__name__)


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


class Moments:
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
