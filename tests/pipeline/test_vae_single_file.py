"""VAEs published as one original checkpoint (latent diffusion's layout, as REPA-E and
LightningDiT ship theirs): stage one reads them with a named diffusers config and gets exactly
the latents the same weights give as a diffusers folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from repa_cache.cache.errors import UsageError
from repa_cache.cache.latent_stats import LatentStats, stats_path
from repa_cache.cache.reader import CacheReader
from repa_cache.cache.storage import store_path
from repa_cache.eval.config import SampleConfig
from repa_cache.eval.sample import sample
from repa_cache.pipeline.precompute import precompute
from repa_cache.stages.hashing import state_dict_sha256
from repa_cache.stages.vae import VAESpec, load_vae, vae_config
from repa_cache.train.config import TrainConfig
from repa_cache.train.loop import train

from ..conftest import tiny_config
from ..stages.ldm_layout import ldm_state_dict
from .test_precompute import _shard_crops, encode_as_worker


def _f16d32(seed: int, **changes) -> AutoencoderKL:
    """A random f16d32 AutoencoderKL built from a config (tiny-f16's geometry, other weights)."""
    config = dict(vae_config(VAESpec("tiny-f16"))) | changes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL.from_config(config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One f16d32 VAE saved three ways: a diffusers folder, and two single files in latent
    diffusion's layout (a Lightning ``.ckpt`` with the full model's prefix, a bare ``.safetensors``)."""
    root = tmp_path_factory.mktemp("vae")
    vae = _f16d32(3)
    vae.save_pretrained(root / "folder")
    torch.save({"state_dict": ldm_state_dict(vae, "first_stage_model.") | {"loss.logvar": torch.zeros(())}, "epoch": 7},
               root / "vae.ckpt")
    save_file(ldm_state_dict(vae), root / "vae.safetensors")
    return {"folder": root / "folder", "ckpt": root / "vae.ckpt", "safetensors": root / "vae.safetensors"}


@pytest.fixture(scope="module")
def caches(saved, demo_images, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    out = {}
    for kind, path in saved.items():
        out[kind] = root / kind
        config = None if kind == "folder" else str(saved["folder"])
        precompute(tiny_config(demo_images, out[kind], vae=str(path), vae_config=config, flip=False,
                               latent_norm="dataset" if kind == "ckpt" else "vae"))
    return out


def test_every_form_loads_the_same_weights(saved):
    want = state_dict_sha256(load_vae(VAESpec(str(saved["folder"]))))
    assert want == state_dict_sha256(_f16d32(3))
    for kind in ("ckpt", "safetensors"):
        assert state_dict_sha256(load_vae(VAESpec(str(saved[kind]), config=str(saved["folder"])))) == want
        # a config given as the tiny preset of the same geometry reads the same weights
        assert state_dict_sha256(load_vae(VAESpec(str(saved[kind]), config="tiny-f16"))) == want


def test_precompute_from_each_form_stores_the_vaes_own_posterior(caches, demo_images):
    vae = _f16d32(3)
    readers = {kind: CacheReader(path) for kind, path in caches.items()}
    for shard in range(readers["folder"].meta.num_shards):
        idx, crops = _shard_crops(readers["folder"], demo_images, shard)
        mean, std = encode_as_worker(vae, crops)
        for kind, reader in readers.items():
            got = reader.read(idx)
            np.testing.assert_array_equal(got["latents/mean"][:, 0], mean.numpy(), err_msg=kind)
            np.testing.assert_array_equal(got["latents/std"][:, 0], std.numpy(), err_msg=kind)
    model = readers["ckpt"].group("latents").meta.model
    assert (model["latent_channels"], model["downsample_factor"]) == (32, 16)
    assert (Path(model["id"]).name, Path(model["config"]).name) == ("vae.ckpt", "folder")
    assert "config" not in readers["folder"].group("latents").meta.model  # a folder's record is as it always was


def test_dataset_statistics_of_the_single_file_cache_equal_numpy(caches):
    reader = CacheReader(caches["ckpt"])
    x = reader.read(reader.valid_indices())["latents/mean"].astype(np.float64)  # (n, 1, 32, 16, 16)
    stats = LatentStats.from_json(json.loads(stats_path(store_path(caches["ckpt"])).read_bytes()), "test")
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 1, 3, 4)), rtol=1e-12, atol=0)
    np.testing.assert_allclose(stats.std, x.std(axis=(0, 1, 3, 4)), rtol=1e-12, atol=0)


def test_a_run_on_the_single_file_cache_samples_with_the_recorded_file_and_config(caches, tmp_path):
    cfg = TrainConfig(cache=str(caches["safetensors"]), out=str(tmp_path / "run"), model="SiT-tiny/1", batch_size=4,
                      max_steps=1, ckpt_every=1, num_workers=0, device="cpu", quiet=True)
    train(cfg)
    res = sample(tmp_path / "run", tmp_path / "s", SampleConfig(num=1, sampler="ode", steps=2, batch_size=1, device="cpu",
                                                                grid=0, quiet=True))
    assert res.written == 1


def test_level_attention_converts_exactly(tmp_path):
    """Latent diffusion's attention inside encoder and decoder levels (VA-VAE's kl-f16 layout)."""
    vae = _f16d32(4, down_block_types=["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
                  up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4)
    vae.save_config(tmp_path / "config")
    save_file(ldm_state_dict(vae), tmp_path / "attn.safetensors")
    loaded = load_vae(VAESpec(str(tmp_path / "attn.safetensors"), config=str(tmp_path / "config")))
    assert state_dict_sha256(loaded) == state_dict_sha256(vae)


def test_va_vae_bundled_config_has_the_kl_f16_layout():
    config = vae_config(VAESpec("va-vae"))
    model = AutoencoderKL.from_config(config)
    assert (config["latent_channels"], 2 ** (len(config["block_out_channels"]) - 1)) == (32, 16)
    keys = ldm_state_dict(model)
    assert "encoder.down.4.attn.1.q.weight" in keys and "decoder.up.4.attn.2.proj_out.weight" in keys
    assert keys["encoder.down.4.attn.0.q.weight"].shape == (512, 512, 1, 1)


def test_a_file_that_does_not_fit_its_config_is_refused_naming_the_first_key(saved, tmp_path, run_cli):
    with pytest.raises(UsageError) as info:
        load_vae(VAESpec(str(saved["safetensors"]), config="tiny"))
    assert str(info.value) == (f"VAE checkpoint {saved['safetensors']} does not fit config 'tiny': encoder.conv_out.weight is "
                               "(64, 16, 3, 3) in the file but (8, 16, 3, 3) in the config")
    attn = tmp_path / "attn"
    _f16d32(0, down_block_types=["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
            up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4).save_config(attn)
    with pytest.raises(UsageError) as info:
        load_vae(VAESpec(str(saved["ckpt"]), config=str(attn)))
    assert str(info.value).endswith(f"does not fit config '{attn}': it has no weight for encoder.down_blocks.4.attentions.0.group_norm.weight")
    # more weights than the config has room for: the first one without a place is named
    extra = ldm_state_dict(_f16d32(3)) | {"encoder.down.4.attn.0.q.weight": torch.zeros(16, 16, 1, 1)}
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(UsageError) as info:
        load_vae(VAESpec(str(tmp_path / "extra.safetensors"), config="tiny-f16"))
    assert str(info.value).endswith("its weight encoder.down.4.attn.0.q.weight has no place in the config")


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_hostile_and_unnamed_single_files_get_one_line(saved, demo_images, tmp_path, run_cli):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"encoder.conv_in.weight": _Planted(marker)}}, tmp_path / "planted.pt")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(4096))
    out = tmp_path / "c"
    cases = {
        "planted.pt": "error: cannot read VAE checkpoint {p}: Weights only load failed",
        "garbage.safetensors": "error: cannot read VAE checkpoint {p}: ",
    }
    for name, want in cases.items():
        p = tmp_path / name
        code, _, err = run_cli(["precompute", str(demo_images), str(out), "--vae", str(p), "--vae-config", "tiny-f16",
                                "--teacher", "tiny", "--device", "cpu", "-q"])
        assert code == 2 and err.startswith(want.format(p=p)) and err.count("\n") == 1, err
    assert not marker.exists() and not out.exists()  # nothing is written before the VAE is read
    code, _, err = run_cli(["precompute", str(demo_images), str(out), "--vae", str(saved["ckpt"]), "--teacher", "tiny", "-q"])
    assert (code, err) == (2, f"error: '{saved['ckpt']}' is a single-file checkpoint: name the diffusers config it is read with "
                              "(--vae-config: va-vae-f16d32, a preset, a local diffusers folder or an HF id)\n")
    code, _, err = run_cli(["precompute", str(demo_images), str(out), "--vae", str(saved["ckpt"]), "--vae-config", "va-vae-f16",
                            "--teacher", "tiny", "-q"])
    assert code == 2 and err.endswith("did you mean 'va-vae-f16d32'?\n"), err
    assert not out.exists()
