"""The VAE stage: tiny model geometry, encode equals a hand call, loading errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from cache.errors import UsageError
from stages.vae import (
    DEFAULT_VAE,
    TINY_VAE,
    VAESpec,
    encode_images,
    load_vae,
    state_dict_sha256,
    vae_metadata,
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


def test_metadata(tiny_vae: AutoencoderKL) -> None:
    meta = vae_metadata(tiny_vae, VAESpec("tiny"))
    assert meta == {
        "id": "tiny",
        "revision": None,
        "tiny": True,
        "class": "AutoencoderKL",
        "scaling_factor": 0.18215,
        "shift_factor": None,
        "latent_channels": 4,
        "downsample_factor": 8,
        "weights_sha256": state_dict_sha256(tiny_vae),
    }


def test_local_folder_loads(tiny_vae: AutoencoderKL, tmp_path: Path) -> None:
    tiny_vae.save_pretrained(tmp_path / "vae-dir")
    loaded = load_vae(VAESpec(str(tmp_path / "vae-dir")))
    assert state_dict_sha256(loaded) == state_dict_sha256(tiny_vae)
    meta = vae_metadata(loaded, VAESpec(str(tmp_path / "vae-dir")))
    assert meta["tiny"] is False and meta["downsample_factor"] == 8
    # A full pipeline folder with the VAE in vae/ works too.
    tiny_vae.save_pretrained(tmp_path / "pipeline" / "vae")
    loaded = load_vae(VAESpec(str(tmp_path / "pipeline")))
    assert state_dict_sha256(loaded) == state_dict_sha256(tiny_vae)


def test_missing_local_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "vae")
    with pytest.raises(UsageError) as info:
        load_vae(VAESpec(missing))
    assert str(info.value) == f"cannot load VAE '{missing}': no such folder {missing}{SUFFIX}"


def test_file_is_not_a_vae_folder(tmp_path: Path) -> None:
    path = tmp_path / "vae.safetensors"
    path.write_bytes(b"")
    with pytest.raises(UsageError) as info:
        load_vae(VAESpec(str(path)))
    assert str(info.value) == f"cannot load VAE '{path}': {path} is not a folder{SUFFIX}"


def test_empty_local_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        load_vae(VAESpec(str(tmp_path)))
    assert str(info.value).startswith(f"cannot load VAE '{tmp_path}': ")
    assert str(info.value).endswith(SUFFIX)


@pytest.mark.usefixtures("hf_offline")
@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")  # inside diffusers
@pytest.mark.parametrize("name", ["nobody/no-such-vae", DEFAULT_VAE])
def test_hub_id_offline(name: str) -> None:
    with pytest.raises(UsageError) as info:
        load_vae(VAESpec(name, revision="main"))
    message = str(info.value)
    assert message.startswith(f"cannot load VAE '{name}': ")
    assert message.endswith(SUFFIX)
    assert "\n" not in message
