"""The VAE stage: tiny model geometry, encode equals a hand call, the latent normalisation of a
config, loading errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import LatentNorm
from repa_cache.stages.hashing import state_dict_sha256
from repa_cache.stages.vae import (
    DEFAULT_VAE,
    TINY_VAE,
    VAESpec,
    encode_images,
    latent_norm,
    load_vae,
    vae_config,
)

SUFFIX = "; pass a local diffusers folder with --vae"


@pytest.fixture(scope="module")
def tiny_vae() -> AutoencoderKL:
    return load_vae(VAESpec(TINY_VAE))


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def test_spec_defaults() -> None:
    assert VAESpec() == VAESpec(name="stabilityai/sd-vae-ft-ema", revision=None)
    assert DEFAULT_VAE == "stabilityai/sd-vae-ft-ema"


def test_tiny_geometry(tiny_vae: AutoencoderKL) -> None:
    mean, std = encode_images(tiny_vae, images(2, 256))
    assert mean.shape == std.shape == (2, 4, 32, 32)
    assert mean.dtype == std.dtype == torch.float32
    assert (std > 0).all()
    assert not tiny_vae.training
    assert not any(p.requires_grad for p in tiny_vae.parameters())


def test_encode_matches_hand_call(tiny_vae: AutoencoderKL) -> None:
    batch = images(3, 64, seed=1)
    mean, std = encode_images(tiny_vae, batch)
    with torch.no_grad():
        dist = tiny_vae.encode(batch.float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(mean, dist.mean, rtol=0, atol=0)
    torch.testing.assert_close(std, dist.std, rtol=0, atol=0)
    assert mean.shape == (3, 4, 8, 8)
    assert not mean.requires_grad


def test_pixel_range_matters(tiny_vae: AutoencoderKL) -> None:
    """The images are scaled to [-1, 1]: a /255 scaling would give other latents."""
    batch = images(1, 64, seed=2)
    mean, _ = encode_images(tiny_vae, batch)
    with torch.no_grad():
        wrong = tiny_vae.encode(batch.float() / 255.0).latent_dist.mean
    assert not torch.allclose(mean, wrong)


def test_low_precision_vae_returns_float32() -> None:
    vae = load_vae(VAESpec("tiny"), dtype=torch.bfloat16)
    assert next(vae.parameters()).dtype == torch.bfloat16
    mean, std = encode_images(vae, images(1, 64))
    assert mean.dtype == std.dtype == torch.float32
    assert mean.shape == (1, 4, 8, 8)


def test_encode_rejects_float_images(tiny_vae: AutoencoderKL) -> None:
    with pytest.raises(ValueError, match="uint8"):
        encode_images(tiny_vae, torch.zeros(1, 3, 64, 64))


def test_tiny_is_identical_across_loads_and_keeps_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = load_vae(VAESpec("tiny"))
    after = torch.rand(3)
    second = load_vae(VAESpec("tiny"))
    assert state_dict_sha256(first) == state_dict_sha256(second)
    torch.testing.assert_close(after, expected)  # building did not consume the global RNG


def test_state_dict_sha256_sees_every_change() -> None:
    vae = load_vae(VAESpec("tiny"))
    before = state_dict_sha256(vae)
    assert len(before) == 64
    with torch.no_grad():
        next(iter(vae.parameters())).view(-1)[0] += 1e-3
    assert state_dict_sha256(vae) != before
    module = torch.nn.Linear(2, 2)
    assert state_dict_sha256(module) != state_dict_sha256(module.to(torch.bfloat16))


# The relevant part of stabilityai/sd-vae-ft-ema's config.json.
SD_VAE_CONFIG = {"_class_name": "AutoencoderKL", "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
                 "scaling_factor": 0.18215}


def test_latent_norm_of_sd_vae() -> None:
    norm = latent_norm(SD_VAE_CONFIG)
    assert norm == LatentNorm((0.18215,), (0.0,))
    assert norm.to_json() == {"scale": [0.18215], "shift": [0.0]}


def test_latent_norm_with_shift_factor() -> None:
    """FLUX-style config: one scale and one shift, z = (x - shift) * scale."""
    norm = latent_norm({**SD_VAE_CONFIG, "scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16})
    assert norm == LatentNorm((0.3611,), (0.1159,))
    x = np.full((1, 16, 2, 2), 1.5, dtype=np.float64)
    np.testing.assert_allclose(norm.to_model(x), (1.5 - 0.1159) * 0.3611)


def test_latent_norm_with_per_channel_statistics() -> None:
    """z = (x - mean) / std * scaling_factor, per channel (as diffusers' pipelines apply
    latents_mean / latents_std), checked by hand on one latent."""
    mean, std = [0.5, -1.0, 0.0, 2.0], [2.0, 0.5, 1.0, 4.0]
    norm = latent_norm({**SD_VAE_CONFIG, "scaling_factor": 0.5, "latents_mean": mean, "latents_std": std})
    assert norm.channels == 4
    assert norm.scale == (0.25, 1.0, 0.5, 0.125) and norm.shift == (0.5, -1.0, 0.0, 2.0)
    x = np.random.default_rng(0).standard_normal((2, 4, 3, 3))  # (B, C, h, w)
    by_hand = np.stack([(x[:, c] - mean[c]) / std[c] * 0.5 for c in range(4)], axis=1)  # (B, C, h, w)
    np.testing.assert_allclose(norm.to_model(x), by_hand, rtol=1e-12)
    np.testing.assert_allclose(norm.from_model(norm.to_model(x)), x, rtol=1e-12)


def test_latent_norm_without_scaling_factor_takes_autoencoderkl_default() -> None:
    config = {k: v for k, v in SD_VAE_CONFIG.items() if k != "scaling_factor"}
    assert latent_norm(config) == LatentNorm((AutoencoderKL().config.scaling_factor,), (0.0,))
    assert latent_norm({**config, "scaling_factor": None}) == latent_norm(config)


def test_latent_norm_refuses_ambiguous_configs() -> None:
    with pytest.raises(UsageError, match="both per-channel"):
        latent_norm({**SD_VAE_CONFIG, "shift_factor": 0.1, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    with pytest.raises(UsageError, match="4 latents_mean values but 3 latents_std"):
        latent_norm({**SD_VAE_CONFIG, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 3})
    with pytest.raises(UsageError, match="latents_std must be positive"):
        latent_norm({**SD_VAE_CONFIG, "latents_mean": [0.0] * 4, "latents_std": [1.0, 0.0, 1.0, 1.0]})


def test_tiny_config_and_norm(tiny_vae: AutoencoderKL) -> None:
    config = vae_config(VAESpec(TINY_VAE))
    assert config == dict(tiny_vae.config)
    assert latent_norm(config) == LatentNorm((0.18215,), (0.0,))


def test_local_folder_loads(tiny_vae: AutoencoderKL, tmp_path: Path) -> None:
    tiny_vae.save_pretrained(tmp_path / "vae-dir")
    loaded = load_vae(VAESpec(str(tmp_path / "vae-dir")))
    assert state_dict_sha256(loaded) == state_dict_sha256(tiny_vae)
    assert vae_config(VAESpec(str(tmp_path / "vae-dir")))["block_out_channels"] == [8, 16, 16, 16]
    # A full pipeline folder with the VAE in vae/ works too, for the weights and for the config.
    tiny_vae.save_pretrained(tmp_path / "pipeline" / "vae")
    loaded = load_vae(VAESpec(str(tmp_path / "pipeline")))
    assert state_dict_sha256(loaded) == state_dict_sha256(tiny_vae)
    assert vae_config(VAESpec(str(tmp_path / "pipeline")))["latent_channels"] == 4


@pytest.mark.parametrize("read", [load_vae, vae_config])
def test_missing_local_path(tmp_path: Path, read: Callable[[VAESpec], object]) -> None:
    missing = str(tmp_path / "no" / "vae")
    with pytest.raises(UsageError) as info:
        read(VAESpec(missing))
    assert str(info.value) == f"cannot load VAE '{missing}': no such folder {missing}{SUFFIX}"


def test_file_is_not_a_vae_folder(tmp_path: Path) -> None:
    path = tmp_path / "vae.txt"
    path.write_bytes(b"")
    with pytest.raises(UsageError) as info:
        load_vae(VAESpec(str(path)))
    assert str(info.value) == (f"cannot load VAE '{path}': {path} is not a folder (a single-file checkpoint ends in "
                               f".safetensors, .pt, .pth, .ckpt, .bin){SUFFIX}")
    single = tmp_path / "vae.safetensors"
    single.write_bytes(b"")
    for read in (load_vae, vae_config):
        with pytest.raises(UsageError) as info:
            read(VAESpec(str(single)))
        assert str(info.value) == (f"'{single}' is a single-file checkpoint: name the diffusers config it is read with "
                                   "(--vae-config: va-vae-f16d32, a preset, a local diffusers folder or an HF id)")
    with pytest.raises(UsageError) as info:
        vae_config(VAESpec("tiny", config="tiny-f16"))
    assert str(info.value) == "--vae-config applies to single-file checkpoints only; 'tiny' brings its own config"


def test_empty_local_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        load_vae(VAESpec(str(tmp_path)))
    assert str(info.value).startswith(f"cannot load VAE '{tmp_path}': ")
    assert str(info.value).endswith(SUFFIX)


@pytest.mark.usefixtures("hf_offline")
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")  # inside diffusers
@pytest.mark.parametrize("name", ["nobody/no-such-vae", DEFAULT_VAE])
@pytest.mark.parametrize("read", [load_vae, vae_config])
def test_hub_id_offline(name: str, read: Callable[[VAESpec], object]) -> None:
    with pytest.raises(UsageError) as info:
        read(VAESpec(name, revision="main"))
    message = str(info.value)
    assert message.startswith(f"cannot load VAE '{name}': ")
    assert message.endswith(SUFFIX)
    assert "\n" not in message
