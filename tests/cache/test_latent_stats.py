"""Dataset latent statistics: exact per-channel mean and std of every stored posterior mean,
stored with the cache, shown by ``repa stats`` and used by ``repa train --latent-norm dataset``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from repa_cache.cache.latent_stats import LatentStats, stats_path
from repa_cache.cache.reader import CacheReader
from repa_cache.cache.storage import store_path
from repa_cache.pipeline.precompute import precompute
from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint

from ..conftest import tiny_config


@pytest.fixture(scope="module")
def stats_cache(demo_images, tmp_path_factory):
    """A cache (both views, one skipped input) whose statistics precompute computed."""
    out = tmp_path_factory.mktemp("stats") / "c"
    precompute(tiny_config(demo_images, out, latent_norm="dataset"))
    return out


def _stored(cache) -> LatentStats:
    return LatentStats.from_json(json.loads(stats_path(store_path(cache)).read_bytes()), "test")


def test_statistics_equal_numpy_over_every_stored_posterior_mean(stats_cache):
    reader = CacheReader(stats_cache)
    valid = reader.valid_indices()
    x = reader.read(valid)["latents/mean"].astype(np.float64)  # (n, V, C, h, w)
    stats = _stored(stats_cache)
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 1, 3, 4)), rtol=1e-12, atol=0)
    np.testing.assert_allclose(stats.std, x.std(axis=(0, 1, 3, 4)), rtol=1e-12, atol=0)
    assert (stats.samples, stats.values) == (len(valid), len(valid) * 2 * 32 * 32)
    assert stats.latents_fingerprint == reader.group("latents").commit["fingerprint_hash"]
    norm = stats.norm  # z = (x - mean) / std: the normalised latents have mean 0 and std 1 per channel
    z = (x - np.array(norm.shift)[None, None, :, None, None]) * np.array(norm.scale)[None, None, :, None, None]
    np.testing.assert_allclose(z.mean(axis=(0, 1, 3, 4)), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=(0, 1, 3, 4)), 1, rtol=1e-12)


def test_the_command_adds_the_same_statistics_to_an_existing_cache(stats_cache, demo_images, tmp_path, run_cli):
    other = tmp_path / "c"
    precompute(tiny_config(demo_images, other))
    assert not stats_path(store_path(other)).exists()
    code, out, err = run_cli(["latent-stats", str(other), "-q"])
    assert code == 0, err
    assert out.splitlines()[0] == f"wrote {stats_path(store_path(other))}"
    assert _stored(other) == _stored(stats_cache)
    code, out, _ = run_cli(["stats", str(other)])
    assert code == 0 and f"latent stats   over {_stored(other).samples} samples" in out


def test_training_normalises_with_them_and_says_what_they_cover(stats_cache, tmp_path, run_cli, caplog):
    base = ["train", "--cache", str(stats_cache), "--model", "SiT-tiny/2", "--batch-size", "4", "--max-steps", "1",
            "--workers", "0", "--device", "cpu", "-q"]
    code, _, err = run_cli([*base, "--out", str(tmp_path / "r"), "--latent-norm", "dataset", "--holdout", "2"])
    assert code == 0, err
    card = load_checkpoint(latest_checkpoint(tmp_path / "r")).card
    assert card.norm == _stored(stats_cache).norm and card.train["latent_norm"] == "dataset"
    assert any("they are in the statistics but not in the training set" in r.getMessage() for r in caplog.records)
    code, _, err = run_cli([*base, "--out", str(tmp_path / "r"), "--latent-norm", "vae", "--max-steps", "2"])
    assert code == 2 and "the config changed (latent_norm: dataset -> vae)" in err


def test_missing_damaged_or_foreign_statistics_are_refused_in_one_line(stats_cache, demo_images, tmp_path, run_cli):
    plain = tmp_path / "plain"
    precompute(tiny_config(demo_images, plain))
    base = ["train", "--model", "SiT-tiny/2", "--batch-size", "4", "--max-steps", "1", "--workers", "0", "--device", "cpu",
            "--latent-norm", "dataset", "-q"]
    code, _, err = run_cli([*base, "--cache", str(plain), "--out", str(tmp_path / "a")])
    root = store_path(plain)
    assert (code, err) == (2, f"error: --latent-norm dataset: the cache {root} holds no latent statistics; compute them with "
                              f"repa latent-stats {root} (a webdataset export carries its cache's: export again after computing them)\n")
    path = stats_path(root)
    file = Path(path.path)
    file.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(stats_path(store_path(stats_cache)).read_bytes())
    file.write_text(json.dumps(record | {"latents_fingerprint": "0" * 64}))  # edited: the checksum no longer matches
    code, _, err = run_cli([*base, "--cache", str(plain), "--out", str(tmp_path / "b")])
    assert code == 2 and err.startswith(f"error: {path}: unusable latent statistics (its checksum does not match its content)")
    foreign = dataclasses.replace(LatentStats.from_json(record, "x"), latents_fingerprint="0" * 64)  # consistent, of other latents
    file.write_text(json.dumps(foreign.to_json()))
    code, _, err = run_cli([*base, "--cache", str(plain), "--out", str(tmp_path / "c")])
    assert (code, err) == (2, f"error: {path} was computed from other latents than the cache holds; compute them again with "
                              "repa latent-stats\n")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_copies_and_exports_carry_them_and_runs_on_either_normalise_alike(stats_cache, tmp_path, run_cli):
    code, out, err = run_cli(["cache", "copy", str(stats_cache), str(tmp_path / "copy"), "-q"])
    assert code == 0 and "latent statistics: copied" in out, err
    assert _stored(tmp_path / "copy") == _stored(stats_cache)
    code, out, _ = run_cli(["cache", "copy", str(stats_cache), str(tmp_path / "copy"), "-q"])
    assert code == 0 and "latent statistics: already there" in out
    code, _, err = run_cli(["export-wds", str(stats_cache), str(tmp_path / "wds"), "-q"])
    assert code == 0, err
    assert stats_path(store_path(tmp_path / "wds")) == store_path(tmp_path / "wds") / "latent-stats.json"
    assert _stored(tmp_path / "wds") == _stored(stats_cache)
    norms = []
    for cache in ("copy", "wds"):
        code, _, err = run_cli(["train", "--cache", str(tmp_path / cache), "--out", str(tmp_path / f"r-{cache}"), "--model",
                                "SiT-tiny/2", "--batch-size", "4", "--max-steps", "1", "--workers", "0", "--device", "cpu",
                                "--latent-norm", "dataset", "-q"])
        assert code == 0, err
        norms.append(load_checkpoint(latest_checkpoint(tmp_path / f"r-{cache}")).card.norm)
    assert norms == [_stored(stats_cache).norm] * 2
    # a second export into the same folder replaces the record with the cache's own
    code, _, err = run_cli(["export-wds", str(stats_cache), str(tmp_path / "wds"), "-q"])
    assert code == 0 and _stored(tmp_path / "wds") == _stored(stats_cache), err


def test_damaged_statistics_stay_behind_in_a_copy(stats_cache, tmp_path, run_cli):
    src = tmp_path / "src"
    code, _, err = run_cli(["cache", "copy", str(stats_cache), str(src), "-q"])
    assert code == 0, err
    file = Path(stats_path(store_path(src)).path)
    file.write_text(file.read_text().replace('"samples": ', '"samples": 1'))
    code, out, err = run_cli(["cache", "copy", str(src), str(tmp_path / "dst"), "-q"])
    assert code == 0 and "latent statistics: not copied (damaged or of other latents" in out, err
    assert not stats_path(store_path(tmp_path / "dst")).exists()
