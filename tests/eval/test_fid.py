"""Fréchet distance, image sources, the ADM npz layout, reference-statistics caching, extractors.

The FID pipeline runs with a small injected feature extractor (no Inception download).
"""

from __future__ import annotations

import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa_cache.cache.errors import UsageError
from repa_cache.eval.config import FidConfig
from repa_cache.eval.extractors import INCEPTION_NAME, SPATIAL_NAME, dinov2_extractor, inception_extractor
from repa_cache.eval.fid import compute_stats, fid, iter_images, reference_stats
from repa_cache.eval.images import iter_npz_batches, npz_array_info, save_npz
from repa_cache.eval.metrics import FeatureStats, frechet_distance


def _spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr((s1 s2)^(1/2)) = sum of sqrt(eig(s1^(1/2) s2 s1^(1/2))), a symmetric problem (eigh only)."""
    w, u = np.linalg.eigh(s1)
    root = (u * np.sqrt(w)) @ u.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum())


def test_frechet_distance_matches_an_independent_computation() -> None:
    rng = np.random.default_rng(0)
    for d in (1, 3, 8):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _spd(rng, d), _spd(rng, d)
        want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * _trace_sqrt_product(s1, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8, abs=1e-8)


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(1)
    s = _spd(rng, 5)
    mu = rng.normal(size=5)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
    # Diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu - 1) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu, np.diag(a), np.ones(5), np.diag(b)) == pytest.approx(want, rel=1e-10)
    # Rank-deficient covariances still give a finite value.
    low = np.outer(mu, mu)
    assert np.isfinite(frechet_distance(mu, low, mu, low))


def test_frechet_distance_of_sampled_gaussians() -> None:
    """Statistics of samples of two Gaussians approach the population distance."""
    rng = np.random.default_rng(2)
    d = 4
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, 100_000)
    y = rng.multivariate_normal(mu2, s2, 100_000)
    a, b = FeatureStats.from_features(x, "x"), FeatureStats.from_features(y, "y")
    got = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert got == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=0.03)


# --------------------------------------------------------------------------------------------
# image sources and the npz layout


class PoolExtractor:
    """A small stand-in for Inception: 4x4 average-pooled pixels (48-d); counts what it sees."""

    def __init__(self, name: str = "pool4") -> None:
        self.name = name
        self.seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        self.seen += images.shape[0]
        return torch.nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)


def _images(n: int, brightness: float, seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(brightness, 40, size=(n, 1, 1, 3))
    return np.clip(base + rng.normal(0, 30, size=(n, size, size, 3)), 0, 255).astype(np.uint8)


def _folder(root: Path, images: np.ndarray) -> Path:
    root.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(root / f"{i:06d}.png")
    return root


def test_npz_has_the_adm_layout(tmp_path: Path) -> None:
    """ADM's evaluator opens member arr_0.npy of the zip and reads a uint8 NHWC array."""
    images = _images(7, 128, 0)
    path = save_npz(tmp_path / "s.npz", images, labels=np.arange(7))
    with zipfile.ZipFile(path) as zf:
        assert "arr_0.npy" in zf.namelist()
        with zf.open("arr_0.npy") as f:
            assert np.lib.format.read_magic(f) == (1, 0)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    assert (shape, fortran, dtype) == ((7, 16, 16, 3), False, np.dtype(np.uint8))
    with np.load(path) as f:
        assert np.array_equal(f["arr_0"], images) and f["arr_1"].tolist() == list(range(7))
    assert npz_array_info(path) == ((7, 16, 16, 3), np.dtype(np.uint8))
    assert np.array_equal(np.concatenate(list(iter_npz_batches(path, 3))), images)
    with pytest.raises(ValueError):
        save_npz(tmp_path / "bad.npz", images.astype(np.float32))


def test_fid_with_an_injected_extractor(tmp_path: Path) -> None:
    ref = save_npz(tmp_path / "ref.npz", _images(80, 120, 0))
    same = save_npz(tmp_path / "same.npz", _images(60, 120, 1))
    other = _images(60, 160, 2)
    other_npz = save_npz(tmp_path / "other.npz", other)
    other_dir = _folder(tmp_path / "other", other)
    ext = PoolExtractor()
    stats_dir = tmp_path / "stats"

    close = fid(same, ref, FidConfig(stats_dir=str(stats_dir), batch_size=16), extractors={"fid": ext})["fid"]
    far = fid(other_npz, ref, FidConfig(stats_dir=str(stats_dir), batch_size=16), extractors={"fid": ext})
    assert 0 <= close < far["fid"]
    # The value is the Fréchet distance of the extractor's features, computed by hand here.
    def feats(x: np.ndarray) -> np.ndarray:
        return PoolExtractor()(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy()

    f_ref, f_other = feats(_images(80, 120, 0)), feats(other)
    want = frechet_distance(f_other.mean(0), np.cov(f_other, rowvar=False), f_ref.mean(0), np.cov(f_ref, rowvar=False))
    assert far["fid"] == pytest.approx(want, rel=1e-6)
    assert far["num_samples"] == 60 and far["num_ref"]["fid"] == 80
    # A folder of PNGs of the same images gives the same value.
    assert fid(other_dir, ref, FidConfig(stats_dir=str(stats_dir)), extractors={"fid": ext})["fid"] == pytest.approx(far["fid"], rel=1e-9)


def test_reference_statistics_are_computed_once(tmp_path: Path) -> None:
    ref = _folder(tmp_path / "ref", _images(40, 100, 3))
    samples = save_npz(tmp_path / "s.npz", _images(20, 100, 4))
    ext = PoolExtractor()
    first = fid(samples, ref, FidConfig(stats_dir=str(tmp_path / "stats")), extractors={"fid": ext})
    assert ext.seen == 60
    second = fid(samples, ref, FidConfig(stats_dir=str(tmp_path / "stats")), extractors={"fid": ext})
    assert ext.seen == 80  # only the samples again
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-12)
    cached = Path(first["ref_stats"]["fid"])
    with np.load(cached) as f:
        assert {"mu", "sigma"} <= set(f.files) and f["sigma"].shape == (48, 48)
    # The cached file is itself a valid reference.
    assert fid(samples, cached, extractors={"fid": ext})["fid"] == pytest.approx(first["fid"], rel=1e-12)
    # A changed reference is recomputed, not served stale.
    Image.fromarray(_images(1, 200, 5)[0]).save(ref / "000000.png")
    stats, path = reference_stats(ref, ext, tmp_path / "stats")
    assert path != cached and stats.num == 40


def test_adm_reference_batch_statistics_are_used_for_inception(tmp_path: Path) -> None:
    """ADM's reference batch carries its own mu/sigma: FID uses them, not its 10K images."""
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=48), _spd(rng, 48)
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, arr_0=_images(10, 100, 0), mu=mu, sigma=sigma)
    samples = save_npz(tmp_path / "s.npz", _images(30, 100, 1))
    inception_like = PoolExtractor(INCEPTION_NAME)
    fd_only = FidConfig(stats_dir=str(tmp_path / "st"), inception_score=False, precision_recall=False, kid=False)
    got = fid(samples, ref, fd_only, extractors={"fid": inception_like})
    assert inception_like.seen == 30
    # Precision/recall and KID take the features of the batch's images, as ADM's evaluator does.
    full = fid(samples, ref, FidConfig(stats_dir=str(tmp_path / "st")), extractors={"fid": inception_like})
    assert inception_like.seen == 30 + 10 + 30 and full["num_ref_features"] == 10
    assert full["fid"] == got["fid"] and 0 <= full["precision"] <= 1 and full["kid_subset_size"] == 10
    s = compute_stats(samples, PoolExtractor())
    assert got["fid"] == pytest.approx(frechet_distance(s.mu, s.sigma, mu, sigma), rel=1e-9)
    # sFID's features take the batch's mu_s/sigma_s, as ADM's evaluator does.
    mu_s, sigma_s = rng.normal(size=48), _spd(rng, 48)
    np.savez(ref, arr_0=_images(10, 100, 0), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    spatial_like = PoolExtractor(SPATIAL_NAME)
    both = fid(samples, ref, fd_only, extractors={"fid": PoolExtractor(INCEPTION_NAME), "sfid": spatial_like})
    assert spatial_like.seen == 30 and both["fid"] == got["fid"]
    assert both["sfid"] == pytest.approx(frechet_distance(s.mu, s.sigma, mu_s, sigma_s), rel=1e-9)
    # Another extractor computes its statistics from the images of the batch.
    other = PoolExtractor("pool4")
    fid(samples, ref, FidConfig(stats_dir=str(tmp_path / "st")), extractors={"fd": other})
    assert other.seen == 40


def test_fd_dinov2_through_the_teacher_registry(tmp_path: Path) -> None:
    """FD-DINOv2 runs the registry teacher and uses its CLS token (the tiny one here)."""
    ext = dinov2_extractor("tiny")
    a = save_npz(tmp_path / "a.npz", _images(12, 100, 0, size=32))
    b = save_npz(tmp_path / "b.npz", _images(12, 180, 1, size=32))
    res = fid(a, b, FidConfig(stats_dir=str(tmp_path / "st")), extractors={"fd_dinov2": ext})
    assert res["fd_dinov2"] > 0 and ext.name == "tiny-cls"
    assert res["definitions"]["fd_dinov2"].endswith("Fréchet distance of Gaussians fit to the CLS token of teacher 'tiny'")
    feats = ext(torch.from_numpy(_images(3, 100, 0, size=32)).permute(0, 3, 1, 2))
    assert feats.shape == (3, 32)


def test_inception_without_library_or_weights_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no Inception weights file"):
        inception_extractor(tmp_path / "missing.pth")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(UsageError, match=r"pip install 'repa-cache\[eval\]'"):
        inception_extractor()
    # Installed but offline: the library's download fails; the message says what to do.
    fake = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")

    class Offline:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise OSError("<urlopen error [Errno -2] Name or service not known>")

    fake.FeatureExtractorInceptionV3 = Offline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", fake)
    with pytest.raises(UsageError) as err:
        inception_extractor()
    assert "--inception-weights" in str(err.value) and "\n" not in str(err.value)


def test_bad_sources_are_usage_errors(tmp_path: Path) -> None:
    ext = {"fid": PoolExtractor()}
    good = save_npz(tmp_path / "good.npz", _images(4, 100, 0))
    np.savez(tmp_path / "nokey.npz", images=_images(4, 100, 0))
    np.savez(tmp_path / "float.npz", arr_0=_images(4, 100, 0).astype(np.float32))
    (tmp_path / "empty").mkdir()
    mixed = _folder(tmp_path / "mixed", _images(2, 100, 0))
    Image.fromarray(_images(1, 100, 0, size=8)[0]).save(mixed / "000002.png")
    for bad, words in [
        (tmp_path / "missing.npz", "no such"),
        (tmp_path / "nokey.npz", "arr_0"),
        (tmp_path / "float.npz", "uint8"),
        (tmp_path / "empty", "no images"),
        (mixed, "one size"),
    ]:
        with pytest.raises(UsageError, match=words):
            fid(bad, good, FidConfig(stats_dir=str(tmp_path / "st")), extractors=ext)
    assert sum(len(b) for b in iter_images(good, 3)) == 4
    with pytest.raises(UsageError, match="at least 2"):
        compute_stats(save_npz(tmp_path / "one.npz", _images(1, 100, 0)), PoolExtractor())


def test_inception_wrapper_with_local_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real torch-fidelity network from a local weights file (random ones: no download)."""
    tfe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as m:  # build once without weights to get a state dict of the right shape
        m.setattr(tfe, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tfe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = tfe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    ext = inception_extractor(weights)  # pool3 features of uint8 images, resized to 299 inside
    stats = compute_stats(save_npz(tmp_path / "a.npz", _images(2, 100, 1, size=32)), ext)
    assert stats.mu.shape == (2048,) and stats.sigma.shape == (2048, 2048) and stats.extractor == INCEPTION_NAME
    assert np.isfinite(stats.mu).all() and stats.num == 2
    feats, logits = ext.features_and_logits(torch.from_numpy(_images(3, 100, 1, size=32)).permute(0, 3, 1, 2))
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008) and torch.isfinite(logits).all()
    # sFID's features: channels 0..6 of Mixed_6d's 1x1 branch (ADM's mixed_6/conv) on the 17x17
    # map, flattened channels-last; checked against that branch run by hand on the block's input.
    seen: list[torch.Tensor] = []
    ext.net.Mixed_6d.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    images = torch.from_numpy(_images(3, 100, 2, size=32)).permute(0, 3, 1, 2)
    spatial = ext.spatial()(images)
    assert ext.spatial().name == SPATIAL_NAME and spatial.shape == (3, 7 * 17 * 17)
    by_hand = torch.relu(ext.net.Mixed_6d.branch1x1.bn(ext.net.Mixed_6d.branch1x1.conv(seen[0])))
    assert by_hand.shape == (3, 192, 17, 17)
    assert torch.equal(spatial, by_hand[:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    # A weights file that needs more than tensors to unpickle is refused before torch-fidelity opens it.
    hostile = tmp_path / "hostile.pth"
    torch.save({"w": types.SimpleNamespace(a=1)}, hostile)
    with pytest.raises(UsageError, match="is not a plain weights file"):
        inception_extractor(hostile)


def test_a_failing_metric_keeps_the_numbers_computed_before_it(tmp_path: Path) -> None:
    """FD-DINOv2 whose weights cannot load (offline, or a missing file) does not discard the FID
    computed first: the result holds the FID and says why FD-DINOv2 failed, naming the option of
    this command that takes a local file. With nothing computed, the error itself is raised."""
    a = save_npz(tmp_path / "a.npz", _images(12, 100, 0, size=32))
    b = save_npz(tmp_path / "b.npz", _images(12, 180, 1, size=32))
    cfg = FidConfig(stats_dir=str(tmp_path / "st"))
    broken = dinov2_extractor("dinov2-vit-b", checkpoint=str(tmp_path / "missing.pth"))
    alone = fid(a, b, cfg, extractors={"fid": PoolExtractor()})
    res = fid(a, b, cfg, extractors={"fid": PoolExtractor(), "fd_dinov2": broken})
    assert res["fid"] == alone["fid"] and "fd_dinov2" not in res and "fd_dinov2" not in res["definitions"]
    assert res["failed"] == {"fd_dinov2": (
        f"cannot load teacher 'dinov2-vit-b' (vit_base_patch14_dinov2.lvd142m): no such checkpoint file {tmp_path / 'missing.pth'}; "
        "timm fetches weights from the Hugging Face hub (not with HF_HUB_OFFLINE=1 or without a network), "
        "or give a local file with --dinov2-checkpoint FILE")}
    assert "failed" not in alone
    with pytest.raises(UsageError, match="^cannot load teacher 'dinov2-vit-b'"):
        fid(a, b, cfg, extractors={"fd_dinov2": broken})
