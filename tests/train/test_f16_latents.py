"""f16 latent spaces and patch-1 students: a random-initialised f16d32 ``AutoencoderKL``
(``--vae tiny-f16``) gives 32x16x16 latents at 256 px, whose grid is the teacher's, so SiT/1
students align token for token; every method that trains a flat SiT trains, resumes exactly and
samples on them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from repa_cache.cache.format import LatentNorm, LatentsRecord
from repa_cache.cache.reader import CacheReader
from repa_cache.eval.config import SampleConfig
from repa_cache.eval.sample import sample
from repa_cache.pipeline.precompute import precompute
from repa_cache.stages.vae import VAESpec, load_vae
from repa_cache.train.checkpoint import latest_checkpoint, load_checkpoint
from repa_cache.train.config import TrainConfig
from repa_cache.train.loop import plan_run, train
from repa_cache.train.model import sit_config

from ..conftest import tiny_config
from ..pipeline.test_precompute import _shard_crops, encode_as_worker


@pytest.fixture(scope="module")
def f16_cache(demo_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("f16") / "c"
    precompute(tiny_config(demo_images, out, vae="tiny-f16", flip=False, teacher_layers={"tiny": "2"}))
    return out


def test_tiny_f16_latents_are_the_vaes_own_posterior(f16_cache, demo_images):
    reader = CacheReader(f16_cache)
    rec = LatentsRecord.of(reader.group("latents").meta)
    assert (rec.latent_size, rec.latent_channels, reader.group("latents").meta.model["downsample_factor"]) == (16, 32, 16)
    vae = load_vae(VAESpec("tiny-f16"))
    idx, crops = _shard_crops(reader, demo_images, 0)
    mean, std = encode_as_worker(vae, crops)
    got = reader.read(idx)
    np.testing.assert_array_equal(got["latents/mean"][:, 0], mean.numpy())
    np.testing.assert_array_equal(got["latents/std"][:, 0], std.numpy())


def test_patch_1_sizes_put_one_token_on_each_f16_latent():
    for size in ("S", "B", "L", "XL", "tiny"):
        cfg = sit_config(f"SiT-{size}/1", input_size=16, in_channels=32)
        assert (cfg.patch_size, cfg.num_tokens) == (1, 256)
    for size in ("B", "L", "XL", "tiny"):  # U-shaped: the middle stage runs on 8x8, as USiT/2 on f8 latents
        u1, u2 = sit_config(f"USiT-{size}/1", input_size=16, in_channels=32), sit_config(f"USiT-{size}/2")
        assert (u1.layout, u1.patch_size, u1.num_tokens) == ("u", 1, 256)
        assert dataclasses.replace(u1, patch_size=2, input_size=32, in_channels=4) == u2


def _cfg(cache: Path, out: Path, method: str, max_steps: int) -> TrainConfig:
    model = "USiT-tiny/1" if method == "urepa" else "SiT-tiny/1"  # U-REPA's student is U-shaped
    return TrainConfig(cache=str(cache), out=str(out), model=model, method=method, batch_size=4, max_steps=max_steps,
                       ckpt_every=3, log_every=3, num_workers=0, device="cpu", quiet=True, seed=5)


@pytest.mark.parametrize("method", ["repa", "irepa", "reg", "gmem", "haste", "urepa"])
def test_each_method_trains_resumes_exactly_and_samples_on_f16_latents(f16_cache, tmp_path, method):
    setup = plan_run(_cfg(f16_cache, tmp_path / "p", method, 6))
    assert (setup.model_config.in_channels, setup.model_config.input_size, setup.model_config.num_tokens) == (32, 16, 256)
    train(_cfg(f16_cache, tmp_path / "straight", method, 6))
    train(_cfg(f16_cache, tmp_path / "resumed", method, 3))
    assert train(_cfg(f16_cache, tmp_path / "resumed", method, 6)).resumed_from == 3
    a, b = (load_checkpoint(latest_checkpoint(tmp_path / r)) for r in ("straight", "resumed"))
    assert a.step == b.step == 6
    for part in ("model", "ema"):
        for k, v in getattr(a, part).items():
            assert torch.equal(v, getattr(b, part)[k]), f"{part}.{k}"
    # sampling inverts the normalisation training applied, from the card
    assert a.card.norm == LatentsRecord.of(CacheReader(f16_cache).group("latents").meta).norm
    res = sample(tmp_path / "straight", tmp_path / "s", SampleConfig(num=2, sampler="ode", steps=2, batch_size=2, device="cpu",
                                                                     grid=0, quiet=True,
                                                                     bank=str(f16_cache) if method == "gmem" else None))
    assert res.written == 2
    with np.load(res.npz) as f:
        assert f["arr_0"].shape == (2, 256, 256, 3)


def test_the_normalisation_round_trips_a_latent():
    norm = LatentNorm((0.18215,), (0.0,))
    x = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(0)) * 5
    torch.testing.assert_close(norm.from_model(norm.to_model(x)), x, rtol=1e-6, atol=0)
    per_channel = dataclasses.replace(norm, scale=tuple(0.5 + 0.01 * c for c in range(32)), shift=tuple(0.1 * c for c in range(32)))
    torch.testing.assert_close(per_channel.from_model(per_channel.to_model(x)), x, rtol=1e-6, atol=1e-6)


def test_a_patch_size_that_misses_the_teachers_grid_names_the_one_that_fits(f16_cache, tmp_path, run_cli):
    code, _, err = run_cli(["train", "--cache", str(f16_cache), "--out", str(tmp_path / "r"), "--model", "SiT-tiny/2", "-q"])
    assert (code, err) == (2, "error: teacher 'tiny' has 256 tokens but SiT-tiny/2 on 16x16 latents has 64; "
                              "pick --model SiT-tiny/1 or pass --resample-teacher\n")
