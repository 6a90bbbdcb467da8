"""Alignment measures: CKNNA and mutual kNN on synthetic representations, and
``alignment_metrics`` (the trainer's periodic log, also behind ``repa align``) on the tiny cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import LatentNorm
from repa_cache.cache.reader import CacheReader
from repa_cache.train.alignment import alignment_metrics, cknna, mutual_knn
from repa_cache.train.loss import repa_loss
from repa_cache.train.model import SiT, sit_config
from repa_cache.train.noise import SampleNoise


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


# --------------------------------------------------------------------------------------------
# on a model and the tiny cache


@pytest.fixture(scope="module")
def student(tiny_cache) -> SiT:
    """A SiT-tiny/2 shaped for the tiny cache, moved off its zero init so outputs depend on inputs."""
    reader = CacheReader(tiny_cache, groups=["latents", "tiny"])
    lat = reader.group("latents").meta.model
    mcfg = sit_config("SiT-tiny/2", input_size=int(lat["latent_size"]), in_channels=int(lat["latent_channels"]),
                      num_classes=len(reader.meta.class_names), z_dims=(int(reader.group("tiny").meta.model["dim"]),))
    torch.manual_seed(0)
    model = SiT(mcfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _expected_cosine(model: SiT, cache, num: int, t: float, path: str, scale: float) -> float:
    """The REPA objective's cosine on the last ``num`` valid samples, computed by hand."""
    reader = CacheReader(cache, groups=["latents", "tiny"])
    idx = reader.valid_indices()[-num:]
    data = reader.read(idx, ["latents", "tiny"])
    x0 = torch.from_numpy(data["latents/mean"][:, 0]) * scale  # (n, C, h, w) view 0, in the model's space
    eps = SampleNoise(0, idx.tolist()).randn(tuple(x0.shape[1:])).float()
    alpha, sigma = (1 - t, t) if path == "linear" else (math.cos(math.pi * t / 2), math.sin(math.pi * t / 2))
    with torch.no_grad():
        _, zs = model.eval()(alpha * x0 + sigma * eps, torch.full((len(idx),), t), torch.from_numpy(data["label"]))
    _, cos = repa_loss(zs, [torch.from_numpy(data["teachers/tiny/patch"][:, 0]).float()])
    return float(cos[0])


def test_alignment_metrics_on_the_tiny_cache(student: SiT, tiny_cache) -> None:
    model = student.train()
    a = alignment_metrics(model, tiny_cache, ["tiny"], num=8, k=2, batch_size=8)
    b = alignment_metrics(model, CacheReader(tiny_cache, groups=["latents", "tiny"]), ["tiny"], num=8, k=2, batch_size=3)
    assert model.training, "the model's train/eval mode is restored"
    assert set(a) == {"align/num", "align/t", "align/cos/tiny", "align/cknna/tiny", "align/cknna_proj/tiny",
                      "align/mutual_knn/tiny"}
    assert a["align/num"] == 8 and a["align/t"] == 0.5
    for key in a:  # the same numbers for any batch size
        assert a[key] == pytest.approx(b[key], abs=1e-5)
    assert -1 <= a["align/cknna/tiny"] <= 1 + 1e-9 and 0 <= a["align/mutual_knn/tiny"] <= 1

    # The mean cosine is the REPA objective's cosine at t = 0.5, on latents scaled by the cache's
    # normalisation (the tiny VAE's scaling factor 0.18215, no shift).
    assert LatentNorm.of_latents(CacheReader(tiny_cache).group("latents").meta.model) == LatentNorm((0.18215,), (0.0,))
    assert a["align/cos/tiny"] == pytest.approx(_expected_cosine(model, tiny_cache, 8, 0.5, "linear", 0.18215), abs=1e-5)


def test_alignment_metrics_use_the_given_path_and_normalisation(student: SiT, tiny_cache) -> None:
    cosine = alignment_metrics(student, tiny_cache, ["tiny"], num=6, k=2, t=0.3, path="cosine")
    assert cosine["align/cos/tiny"] == pytest.approx(_expected_cosine(student, tiny_cache, 6, 0.3, "cosine", 0.18215), abs=1e-5)
    norm = LatentNorm((0.5,), (0.0,))  # the model's own normalisation overrides the cache's
    other = alignment_metrics(student, tiny_cache, ["tiny"], num=6, k=2, t=0.3, path="linear", norm=norm)
    assert other["align/cos/tiny"] == pytest.approx(_expected_cosine(student, tiny_cache, 6, 0.3, "linear", 0.5), abs=1e-5)


def test_alignment_metrics_refuse_bad_arguments(student: SiT, tiny_cache) -> None:
    with pytest.raises(UsageError, match="--t"):
        alignment_metrics(student, tiny_cache, ["tiny"], t=0.0)
    with pytest.raises(UsageError, match="--num"):
        alignment_metrics(student, tiny_cache, ["tiny"], num=0)
    with pytest.raises(UsageError, match="--precision"):
        alignment_metrics(student, tiny_cache, ["tiny"], precision="fp16")
    with pytest.raises(UsageError, match="2 teachers named for a model with 1 projectors"):
        alignment_metrics(student, tiny_cache, ["tiny", "tiny"])
