"""Group descriptions of stage one: what the latents and teacher groups record, and fingerprints
that stay fixed (a changed fingerprint would refuse to resume every existing cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import CODE_VERSION, CROP_RULE, FORMAT_VERSION, VIEW_NAMES, CacheMeta, LatentNorm, fingerprint_diff
from repa_cache.pipeline.groups import teacher_group_meta, vae_group
from repa_cache.stages.teachers import get_teacher, teacher_metadata
from repa_cache.stages.vae import TINY_VAE, VAESpec, load_vae


@pytest.fixture(scope="module")
def meta() -> CacheMeta:
    return CacheMeta(FORMAT_VERSION, CODE_VERSION, num_samples=10, shard_size=4, resolution=256, crop=CROP_RULE,
                     views=VIEW_NAMES, seed=0, class_names=("a", "b"), source={"kind": "imagefolder"},
                     base_fingerprint={"listing": "x", "seed": 0})


def test_latents_group_records_the_vae_latent_norm(meta: CacheMeta) -> None:
    g = vae_group(meta, VAESpec(TINY_VAE))
    assert g.model["latent_norm"] == {"scale": [0.18215], "shift": [0.0]}
    assert LatentNorm.of_latents(g.model) == LatentNorm((0.18215,), (0.0,))
    assert "scaling_factor" not in g.model and "shift_factor" not in g.model  # described once
    assert (g.model["latent_channels"], g.model["latent_size"], g.model["downsample_factor"]) == (4, 32, 8)


def test_fingerprints_are_those_existing_caches_were_written_with(meta: CacheMeta, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashes computed before the group descriptions moved into stages/ (format v1), and the same
    descriptions under format v2, which differ from them by the format version alone."""
    from repa_cache.pipeline import groups

    def hashes() -> list[str]:
        return [vae_group(meta, VAESpec(TINY_VAE)).fingerprint_hash, vae_group(meta, VAESpec(TINY_VAE), "bf16").fingerprint_hash,
                teacher_group_meta(meta, "tiny", "float16").fingerprint_hash,
                teacher_group_meta(meta, "dinov2-vit-b-reg", "float16", "/x/ckpt.pth").fingerprint_hash]

    with monkeypatch.context() as m:
        m.setattr(groups, "FORMAT_VERSION", 1)
        assert hashes() == ["1dd87cd6e637f378f23617417a24ae1c6ee5a0ee4da9e021881cba6221ed3f59",
                            "39fa6b9e0a714f3187c251c89bb1eda22b66c2be9c3dc61774e1a1fa9fd4821e",
                            "4530eb98e649de335db4a1a47db5b907625ad9358a9de22b16005b62e72f83ae",
                            "6cab7ffc6e1ac885ce05c144b5585e580bfcf0c84a678b858b8bc015010f4ac6"]
    v2 = [vae_group(meta, VAESpec(TINY_VAE)), teacher_group_meta(meta, "tiny", "float16")]
    assert [g.fingerprint["format_version"] for g in v2] == [2, 2]
    assert [fingerprint_diff(g.fingerprint, g.fingerprint | {"format_version": 1}) for g in v2] == [[], []]
    assert hashes()[2] != "4530eb98e649de335db4a1a47db5b907625ad9358a9de22b16005b62e72f83ae"  # a v2 group is told from a v1 one


def test_teacher_group_uses_the_teacher_description(meta: CacheMeta) -> None:
    g = teacher_group_meta(meta, "tiny-reg", "float32", precision="bf16")
    assert g.model == teacher_metadata(get_teacher("tiny-reg"), 256, None, "bf16")
    assert [(a.name, a.sample_shape, a.dtype) for a in g.arrays] == [("patch", (256, 48), "float32"), ("cls", (48,), "float32")]


def test_per_channel_vae_statistics_are_recorded(meta: CacheMeta, tmp_path: Path) -> None:
    """A VAE whose config has latents_mean/latents_std, saved as a full pipeline folder (VAE in vae/)."""
    vae = load_vae(VAESpec(TINY_VAE))
    vae.register_to_config(latents_mean=[0.5, 0.0, -0.5, 1.0], latents_std=[2.0, 1.0, 0.5, 4.0], scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "pipeline" / "vae")
    g = vae_group(meta, VAESpec(str(tmp_path / "pipeline")))
    assert g.model["latent_norm"] == {"scale": [0.25, 0.5, 1.0, 0.125], "shift": [0.5, 0.0, -0.5, 1.0]}


@pytest.mark.parametrize("precision", ["auto", "fp16"])
def test_stage_one_precisions(meta: CacheMeta, precision: str) -> None:
    with pytest.raises(UsageError, match=f"^--precision must be one of fp32, bf16, not '{precision}'$"):
        vae_group(meta, VAESpec(TINY_VAE), precision)
    with pytest.raises(UsageError, match="^--precision must be one of fp32, bf16"):
        teacher_group_meta(meta, "tiny", "float16", precision=precision)
