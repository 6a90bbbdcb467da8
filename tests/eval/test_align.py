"""CKNNA and mutual kNN on synthetic representations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache.errors import UsageError
from eval.align import cknna, mutual_knn


def _feats(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cknna_reference(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """A plain numpy transcription: cosine kernels, kNN masks, unbiased HSIC with matrix products."""

    def kernel(x: np.ndarray) -> np.ndarray:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return x @ x.T

    def knn(k_mat: np.ndarray) -> np.ndarray:
        m = np.zeros_like(k_mat)
        for i, row in enumerate(k_mat):
            order = [j for j in np.argsort(-row, kind="stable") if j != i][:k]
            m[i, order] = 1
        return m

    def hsic(K: np.ndarray, L: np.ndarray) -> float:
        n = len(K)
        K, L = K.copy(), L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        one = np.ones(n)
        return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))

    K, L = kernel(a), kernel(b)
    mk, ml = knn(K), knn(L)
    return hsic(mk * ml * K, mk * ml * L) / np.sqrt(hsic(mk * K, mk * K) * hsic(ml * L, ml * L))


def test_cknna_matches_a_reference_transcription() -> None:
    a = _feats(30, 5, 0)
    b = a[:, :3] + 0.5 * _feats(30, 3, 1)
    assert cknna(a, b, k=5) == pytest.approx(_cknna_reference(a.numpy(), b.numpy(), 5), rel=1e-9)


def test_cknna_of_a_representation_with_itself_is_one() -> None:
    a = _feats(200, 16, 0)
    assert cknna(a, a, k=10) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(_feats(16, 16, 1))
    assert cknna(a, 3.0 * a @ q, k=10) == pytest.approx(1.0, abs=1e-9)  # rotation and scale invariant
    assert mutual_knn(a, a @ q, k=10) == pytest.approx(1.0)


def test_cknna_with_independent_noise_is_near_zero() -> None:
    a, noise = _feats(400, 32, 0), _feats(400, 32, 1)
    assert abs(cknna(a, noise, k=10)) < 0.05
    assert mutual_knn(a, noise, k=10) < 0.1  # chance level is about k / n
    noisy = [cknna(a, a + c * _feats(400, 32, 2), k=10) for c in (0.3, 0.6, 1.0)]
    assert 1 > noisy[0] > noisy[1] > noisy[2] > 0.1  # alignment falls as noise grows


def test_cknna_rejects_too_few_samples() -> None:
    a = _feats(6, 3, 0)
    with pytest.raises(UsageError, match="k=5"):
        cknna(a, a, k=5)
    with pytest.raises(UsageError, match="at least 4"):
        cknna(a[:3], a[:3], k=1)
