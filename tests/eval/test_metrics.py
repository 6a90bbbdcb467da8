"""Inception Score, precision/recall and KID: each against a hand computation in numpy/scipy, and
through the evaluation job with a small random-initialised classifier standing in for Inception."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import log_softmax, softmax

from repa_cache.cache.errors import UsageError
from repa_cache.eval.config import FidConfig
from repa_cache.eval.fid import fid, reference_features
from repa_cache.eval.images import save_npz
from repa_cache.eval.metrics import frechet_distance, inception_score, kernel_inception_distance, precision_recall

# --------------------------------------------------------------------------------------------
# hand computations


def _is_by_hand(logits: np.ndarray, splits: int, seed: int) -> tuple[float, float]:
    x = logits[np.random.RandomState(seed).permutation(len(logits))].astype(np.float64)
    n, scores = len(x), []
    for i in range(splits):
        part = x[i * n // splits:(i + 1) * n // splits]
        p, log_p = softmax(part, axis=1), log_softmax(part, axis=1)
        kl = (p * (log_p - np.log(p.mean(axis=0, keepdims=True)))).sum(axis=1)  # KL(p(y|x) || p(y)) per sample
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pr_by_hand(gen: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x: np.ndarray) -> np.ndarray:
        return np.sort(cdist(x, x), axis=1)[:, k]  # column 0 is the point itself

    d = cdist(gen, real)  # (N, M)
    real_radii, gen_radii = radii(real), radii(gen)  # (M,), (N,)
    precision = (d <= real_radii[None, :]).any(axis=1).mean()
    d_real_gen = d.transpose()  # (M, N)
    recall = (d_real_gen <= gen_radii[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def _mmd2_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)

    def kern(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1) ** 3

    kxx, kyy, kxy = kern(x, x), kern(y, y), kern(x, y)
    off = m * (m - 1)
    return float((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())


# --------------------------------------------------------------------------------------------
# the scores


def test_inception_score_matches_the_hand_computation() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(50, 7)).astype(np.float32)
    got = inception_score(logits, splits=5, seed=2020)
    assert got == pytest.approx(_is_by_hand(logits, 5, 2020), rel=1e-10)
    assert inception_score(logits, splits=5, seed=1) == pytest.approx(_is_by_hand(logits, 5, 1), rel=1e-10)


def test_inception_score_closed_forms() -> None:
    """Confident and spread evenly over C classes: IS -> C; one class for every sample: IS = 1."""
    c = 8
    confident = np.full((c * 10, c), -50.0)
    confident[np.arange(c * 10), np.arange(c * 10) % c] = 50.0
    mean, std = inception_score(confident, splits=1)
    assert mean == pytest.approx(c, rel=1e-9) and std == 0
    same = np.tile(np.random.default_rng(1).normal(size=(1, c)), (40, 1))
    assert inception_score(same, splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)
    with pytest.raises(UsageError, match="at least one sample per split: 3 samples, 10 splits"):
        inception_score(same[:3])


def test_precision_recall_matches_the_hand_computation() -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(size=(60, 5))
    gen = rng.normal(0.7, 1.3, size=(45, 5))
    for k in (1, 3, 5):
        got = precision_recall(gen, real, k=k, batch_size=16)  # batched, several parts
        want = _pr_by_hand(gen.astype(np.float32), real.astype(np.float32), k)
        assert got == pytest.approx(want, abs=1e-6)  # fractions of counts, averaged in float32
    p, r = precision_recall(gen, real)
    assert 0 < p < 1 and 0 < r < 1


def test_precision_recall_closed_forms() -> None:
    rng = np.random.default_rng(3)
    real = rng.normal(size=(30, 4))
    assert precision_recall(real.copy(), real) == (1.0, 1.0)  # the same set covers itself
    assert precision_recall(real + 100, real) == (0.0, 0.0)  # far away: nothing inside any ball
    # Collapsed samples all sit on one reference point: precise, but recall only what their
    # zero-radius balls hold (the identical reference point).
    collapsed = np.repeat(real[:1], 10, axis=0)
    p, r = precision_recall(collapsed, real)
    assert p == 1.0 and r == pytest.approx(1 / 30)
    with pytest.raises(UsageError, match="more than 3 samples"):
        precision_recall(real[:3], real)


def test_kid_matches_the_hand_computation() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 6))
    y = rng.normal(0.3, 1, size=(50, 6))
    # One subset of the whole smaller set: a permutation of it, so the estimate is the full one.
    mean, std, size = kernel_inception_distance(x, y[:40], subsets=1, subset_size=1000)
    assert size == 40 and std == 0
    assert mean == pytest.approx(_mmd2_by_hand(x, y[:40]), rel=1e-10)
    # Several subsets, drawn as torch-fidelity draws them (seeded, sample subset then reference).
    state = np.random.RandomState(7)
    by_hand = []
    for _ in range(5):
        a, b = state.choice(40, 20, replace=False), state.choice(50, 20, replace=False)
        by_hand.append(_mmd2_by_hand(x[a], y[b]))
    got = kernel_inception_distance(x, y, subsets=5, subset_size=20, seed=7)
    assert got == pytest.approx((np.mean(by_hand), np.std(by_hand), 20), rel=1e-10)


def test_kid_is_unbiased_for_one_distribution() -> None:
    """Two samples of one distribution: the unbiased estimate averages to about zero (and can be
    negative), unlike the biased one; a shifted set gives a clearly positive value."""
    rng = np.random.default_rng(5)
    same = [kernel_inception_distance(rng.normal(size=(100, 4)), rng.normal(size=(100, 4)), subsets=1)[0]
            for _ in range(40)]
    shifted = kernel_inception_distance(rng.normal(size=(100, 4)), rng.normal(1, 1, size=(100, 4)), subsets=1)[0]
    assert min(same) < 0 < max(same)
    assert abs(np.mean(same)) < 0.2 * shifted


def test_scores_agree_with_torch_fidelity_on_the_same_features() -> None:
    """The wrappers pass our arguments through: torch-fidelity's own entry points agree."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    rng = np.random.default_rng(6)
    gen, real = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(0.2, 1, size=(50, 8)).astype(np.float32)
    isc = isc_features_to_metric(torch.from_numpy(gen), splits=4)
    assert inception_score(gen, splits=4) == (isc["inception_score_mean"], isc["inception_score_std"])
    prc = prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), prc_neighborhood=3,
                                 prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    assert precision_recall(gen, real) == (prc["precision"], prc["recall"])
    # The kernel sums run in float64 here (2048-d cubic kernels lose digits in float32).
    kid = kid_features_to_metric(torch.from_numpy(gen).double(), torch.from_numpy(real).double(), kid_subsets=10,
                                 kid_subset_size=30, verbose=False)
    got = kernel_inception_distance(gen, real, subsets=10, subset_size=30)
    assert got[:2] == pytest.approx((kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]), rel=1e-12)


# --------------------------------------------------------------------------------------------
# the job


class TinyClassifier:
    """A random-initialised stand-in for Inception: 4x4 pooled pixels (48-d) and a fixed linear
    classifier on them (10 logits); counts the images it sees."""

    name = "tiny-classifier"

    def __init__(self) -> None:
        self.head = torch.nn.Linear(48, 10)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(np.random.default_rng(0).normal(0, 8, (10, 48))))
            self.head.bias.zero_()
        self.seen = 0

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen += images.shape[0]
        feats = torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)  # (B, 48)
        return feats, self.head(feats)  # (B, 48), (B, 10)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


def _images(n: int, brightness: float, seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(brightness, 40, size=(n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 30, size=(n, size, size, 3)), 0, 255).astype(np.uint8)


def test_every_metric_of_the_job_equals_its_hand_computation(tmp_path: Path) -> None:
    gen_images, ref_images = _images(40, 140, 1), _images(50, 120, 0)
    samples, ref = save_npz(tmp_path / "s.npz", gen_images), save_npz(tmp_path / "r.npz", ref_images)
    ext = TinyClassifier()
    cfg = FidConfig(stats_dir=str(tmp_path / "st"), is_splits=4, kid_subsets=3, kid_subset_size=25, batch_size=16)
    res = fid(samples, ref, cfg, extractors={"fid": ext})

    with torch.no_grad():
        gen_f, gen_logits = (t.double().numpy() for t in TinyClassifier().features_and_logits(
            torch.from_numpy(gen_images).permute(0, 3, 1, 2)))
        ref_f = TinyClassifier()(torch.from_numpy(ref_images).permute(0, 3, 1, 2)).double().numpy()
    fid_want = frechet_distance(gen_f.mean(0), np.cov(gen_f, rowvar=False), ref_f.mean(0), np.cov(ref_f, rowvar=False))
    assert res["fid"] == pytest.approx(fid_want, rel=1e-6)
    assert (res["is"], res["is_std"]) == pytest.approx(_is_by_hand(gen_logits, 4, 2020), rel=1e-5)
    assert (res["precision"], res["recall"]) == pytest.approx(_pr_by_hand(gen_f, ref_f, 3), abs=1e-6)  # fractions of counts, averaged in float32
    state = np.random.RandomState(2020)
    kid = []
    for _ in range(3):
        a, b = state.choice(40, 25, replace=False), state.choice(50, 25, replace=False)
        kid.append(_mmd2_by_hand(gen_f[a], ref_f[b]))
    assert (res["kid"], res["kid_std"]) == pytest.approx((np.mean(kid), np.std(kid)), rel=1e-4)
    assert res["kid_subset_size"] == 25 and res["num_ref_features"] == 50 and res["skipped"] == {}
    # Every number is defined, with the parameters it was computed with.
    defs = res["definitions"]
    assert set(defs) == {"fid", "is", "precision", "recall", "kid"}
    assert "exp(E_x KL(p(y|x) || p(y)))" in defs["is"] and "4 splits" in defs["is"] and "10 'tiny-classifier' logits" in defs["is"]
    assert "3-NN radius" in defs["precision"] and "3-NN radius" in defs["recall"]
    assert "(x.y/d + 1)^3" in defs["kid"] and "3 random subsets of 25 samples and 25 reference" in defs["kid"]
    assert defs["fid"].startswith("|mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2))")


def test_reference_features_are_computed_once(tmp_path: Path) -> None:
    ref = save_npz(tmp_path / "r.npz", _images(30, 120, 0))
    samples = save_npz(tmp_path / "s.npz", _images(20, 140, 1))
    ext = TinyClassifier()
    cfg = FidConfig(stats_dir=str(tmp_path / "st"), is_splits=2)
    first = fid(samples, ref, cfg, extractors={"fid": ext})
    assert ext.seen == 30 + 20  # one pass over the reference gives its statistics and features
    second = fid(samples, ref, cfg, extractors={"fid": ext})
    assert ext.seen == 30 + 20 + 20
    for key in ("fid", "is", "precision", "recall", "kid"):
        assert second[key] == first[key]
    with np.load(first["ref_features"]) as f:
        assert f["features"].shape == (30, 48) and int(f["num"]) == 30 and str(f["extractor"]) == ext.name
    # At most max_ref_images reference images give features (the first ones), cached apart.
    feats, path = reference_features(ref, ext, tmp_path / "st", max_images=12)
    assert feats.shape == (12, 48) and path is not None and path != Path(first["ref_features"])
    with torch.no_grad():
        want = TinyClassifier()(torch.from_numpy(_images(30, 120, 0)[:12]).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_array_equal(feats, want)


def test_statistics_only_reference_and_extractors_without_logits(tmp_path: Path) -> None:
    ref = save_npz(tmp_path / "r.npz", _images(30, 120, 0))
    samples = save_npz(tmp_path / "s.npz", _images(20, 140, 1))
    cfg = FidConfig(stats_dir=str(tmp_path / "st"), is_splits=2)
    stats_file = Path(fid(samples, ref, cfg, extractors={"fid": TinyClassifier()})["ref_stats"]["fid"])
    res = fid(samples, stats_file, cfg, extractors={"fid": TinyClassifier()})
    assert res["skipped"] == {m: f"{stats_file} holds statistics only; it needs reference images"
                              for m in ("precision", "recall", "kid")}
    assert "fid" in res and "is" in res and "precision" not in res and set(res["definitions"]) == {"fid", "is"}
    with pytest.raises(UsageError, match="holds statistics only"):
        reference_features(stats_file, TinyClassifier(), tmp_path / "st")

    def pool_only(images: torch.Tensor) -> torch.Tensor:
        return TinyClassifier()(images)

    pool_only.name = "pool-only"  # type: ignore[attr-defined]
    res = fid(samples, ref, cfg, extractors={"fid": pool_only})
    assert res["skipped"] == {"is": "the extractor 'pool-only' gives no logits"} and "precision" in res
    for bad, words in [(FidConfig(is_splits=0), "--is-splits must be at least 1, got 0"),
                       (FidConfig(kid_subset_size=1), "--kid-subset-size must be at least 2, got 1"),
                       (FidConfig(pr_k=0), "--pr-k must be at least 1, got 0")]:
        with pytest.raises(UsageError, match=words.replace("(", r"\(")):
            fid(samples, ref, bad, extractors={"fid": TinyClassifier()})


def test_evaluate_command_prints_every_number_with_its_definition(tmp_path: Path, run_cli, monkeypatch) -> None:
    """``repa evaluate`` (and its other name ``repa fid``) with the tiny classifier as its network."""
    import json

    import repa_cache.eval.fid as fid_mod

    monkeypatch.setattr(fid_mod, "inception_extractor", lambda weights, device: TinyClassifier())
    samples = save_npz(tmp_path / "s.npz", _images(20, 140, 1))
    ref = save_npz(tmp_path / "r.npz", _images(30, 120, 0))
    args = [str(samples), str(ref), "--stats-dir", str(tmp_path / "st"), "--is-splits", "2", "--kid-subsets", "4", "-q"]
    code, out, err = run_cli(["evaluate", *args])
    assert code == 0, err
    res = json.loads(out)
    for metric in ("fid", "is", "precision", "recall", "kid"):
        assert isinstance(res[metric], float) and metric in res["definitions"]
    assert "2 splits" in res["definitions"]["is"] and "4 random subsets" in res["definitions"]["kid"]
    assert res["skipped"] == {"sfid": "the extractor 'tiny-classifier' gives no spatial features"}
    assert json.loads(run_cli(["fid", *args])[1]) == res
    code, out, err = run_cli(["evaluate", *args, "--no-kid", "--no-precision-recall"])
    assert code == 0 and set(json.loads(out)["definitions"]) == {"fid", "is"}
    code, _, err = run_cli(["evaluate", *args, "--pr-k", "0"])
    assert code == 2 and err.strip() == "error: --pr-k must be at least 1, got 0"
