"""Teacher registry, preprocessing and feature extraction."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from repa_cache.cache.errors import UsageError
from repa_cache.stages.hashing import state_dict_sha256
from repa_cache.stages.teachers import (
    TEACHERS,
    TeacherSpec,
    encode_arrays,
    encode_images,
    encode_images_hidden,
    get_teacher,
    load_teacher,
    preprocess,
    teacher_geometry,
    teacher_input_size,
    teacher_metadata,
    token_grid,
)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
LOAD_SUFFIX = (
    "; timm fetches weights from the Hugging Face hub (not with HF_HUB_OFFLINE=1 or without a network), "
    "or give a local file with --teacher-checkpoint NAME=FILE"
)


def images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.fixture(scope="module")
def tiny() -> tuple[TeacherSpec, torch.nn.Module]:
    spec = get_teacher("tiny")
    return spec, load_teacher(spec, 256)


def test_registry_names() -> None:
    required = {
        "dinov2-vit-s": "vit_small_patch14_dinov2.lvd142m",
        "dinov2-vit-b": "vit_base_patch14_dinov2.lvd142m",
        "dinov2-vit-l": "vit_large_patch14_dinov2.lvd142m",
        "dinov2-vit-g": "vit_giant_patch14_dinov2.lvd142m",
        "dinov2-vit-b-reg": "vit_base_patch14_reg4_dinov2.lvd142m",
        "dinov2-vit-l-reg": "vit_large_patch14_reg4_dinov2.lvd142m",
        "dinov2-vit-g-reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
        "clip-vit-l": "vit_large_patch14_clip_224.openai",
        "mae-vit-b": "vit_base_patch16_224.mae",
    }
    for name, timm_id in required.items():
        assert TEACHERS[name].timm_id == timm_id
        assert get_teacher(name) is TEACHERS[name]
    assert TEACHERS["tiny"].tiny
    assert all(spec.name == name for name, spec in TEACHERS.items())


@pytest.mark.parametrize("name", sorted(n for n, s in TEACHERS.items() if not s.tiny))
def test_registry_agrees_with_timm(name: str) -> None:
    """Model ids exist in timm, and mean / std match timm's pretrained config (no download)."""
    spec = TEACHERS[name]
    assert timm.list_pretrained(spec.timm_id) == [spec.timm_id]
    cfg = timm.models.get_pretrained_cfg(spec.timm_id)
    assert cfg is not None
    assert tuple(cfg.mean) == spec.mean
    assert tuple(cfg.std) == spec.std
    assert cfg.interpolation == spec.interpolation == "bicubic"
    expected = CLIP if name.startswith("clip") else ((0.5,) * 3, (0.5,) * 3) if name.startswith("siglip") else IMAGENET
    assert (spec.mean, spec.std) == expected


@pytest.mark.parametrize(
    ("name", "resolution", "size", "grid"),
    [
        ("dinov2-vit-b", 256, 224, 16),
        ("dinov2-vit-b", 512, 448, 32),
        ("dinov2-vit-g-reg", 256, 224, 16),
        ("dinov2-vit-l-reg", 512, 448, 32),
        ("clip-vit-l", 256, 224, 16),
        ("clip-vit-l", 512, 224, 16),
        ("mae-vit-b", 256, 256, 16),
        ("mae-vit-b", 512, 512, 32),
        ("tiny", 256, 224, 16),
        ("tiny", 512, 448, 32),
    ],
)
def test_geometry(name: str, resolution: int, size: int, grid: int) -> None:
    spec = get_teacher(name)
    assert teacher_input_size(spec, resolution) == size
    assert token_grid(spec, resolution) == grid


def test_resolution_that_does_not_fit_the_patch() -> None:
    with pytest.raises(UsageError) as info:
        teacher_input_size(get_teacher("dinov2-vit-b"), 300)
    assert str(info.value) == (
        "teacher 'dinov2-vit-b' needs an input side that is a multiple of its patch size 14; "
        "resolution 300 gives 262"
    )


def test_unknown_teacher() -> None:
    with pytest.raises(UsageError) as info:
        get_teacher("dino")
    known = ", ".join(sorted(TEACHERS))
    assert str(info.value) == f"unknown teacher 'dino'; known teachers: {known}, or timm:MODEL_ID"
    assert known.startswith("clip-vit-l, dinov1-vit-b, dinov2-vit-b, dinov2-vit-b-reg, ")


def hand_preprocess(batch: torch.Tensor, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    x = batch.to(torch.float32) / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


@pytest.mark.parametrize(
    ("name", "resolution", "size"),
    [("dinov2-vit-b", 256, 224), ("clip-vit-l", 512, 224), ("mae-vit-b", 256, 256)],
)
def test_preprocess(name: str, resolution: int, size: int) -> None:
    spec = get_teacher(name)
    batch = images(2, resolution, seed=3)
    out = preprocess(spec, batch, resolution)
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
    torch.testing.assert_close(out, hand_preprocess(batch, size, spec.mean, spec.std))


def test_preprocess_without_resize_is_exact() -> None:
    spec = get_teacher("mae-vit-b")
    batch = torch.full((1, 3, 256, 256), 255, dtype=torch.uint8)
    out = preprocess(spec, batch, 256)
    for channel in range(3):
        expected = (1.0 - spec.mean[channel]) / spec.std[channel]
        assert torch.allclose(out[0, channel], torch.tensor(expected))


def test_preprocess_checks_input() -> None:
    spec = get_teacher("tiny")
    with pytest.raises(ValueError, match="uint8"):
        preprocess(spec, torch.zeros(1, 3, 256, 256), 256)
    with pytest.raises(ValueError, match="256x256"):
        preprocess(spec, images(1, 128), 256)


def test_a_group_gets_exactly_the_arrays_it_declares(tiny: tuple[TeacherSpec, torch.nn.Module]) -> None:
    """Stage one asks for a group's arrays by name; each is what the named encoder gives, from one
    forward pass, and a name no teacher output has is refused."""
    spec, model = tiny
    batch = images(2, 256, seed=5)
    patch, cls = encode_images(model, spec, batch, 256)
    got = encode_arrays(model, spec, batch, 256, ["cls", "patch"], {})
    assert list(got) == ["cls", "patch"] and torch.equal(got["cls"], cls) and torch.equal(got["patch"], patch)
    hp, _, hidden = encode_images_hidden(model, spec, batch, 256, 2)
    got = encode_arrays(model, spec, batch, 256, ["patch", "hidden"], {"hidden": {"first_block": 2}})
    assert torch.equal(got["hidden"], hidden) and torch.equal(got["patch"], hp) and hidden.shape == (2, 257, 32)
    with pytest.raises(ValueError, match=r"a teacher group cannot hold attention \(known arrays: patch, cls, hidden, registers\)"):
        encode_arrays(model, spec, batch, 256, ["patch", "attention"], {})


def test_register_tokens_are_the_final_norm_tokens_between_cls_and_patches() -> None:
    spec = get_teacher("tiny-reg")
    model = load_teacher(spec, 256)
    batch = images(2, 256, seed=6)
    got = encode_arrays(model, spec, batch, 256, ["registers", "patch", "cls"], {})
    with torch.no_grad():
        tokens = model.forward_features(hand_preprocess(batch, 224, *IMAGENET))  # (2, 1 + 4 + 256, 48)
    assert tokens.shape == (2, 261, 48) and got["registers"].shape == (2, 4, 48)
    assert torch.equal(got["registers"], tokens[:, 1:5]) and torch.equal(got["patch"], tokens[:, 5:])
    assert torch.equal(got["cls"], tokens[:, 0])
    assert "registers" not in teacher_metadata(get_teacher("tiny"), 256, registers=True)  # no register tokens: nothing stored
    assert teacher_metadata(spec, 256, registers=True)["registers"] == {"num_tokens": 4}
    assert "registers" not in teacher_metadata(spec, 256)


def test_tiny_encode_matches_timm(tiny: tuple[TeacherSpec, torch.nn.Module]) -> None:
    spec, model = tiny
    batch = images(2, 256, seed=4)
    patch, cls = encode_images(model, spec, batch, 256)
    assert patch.shape == (2, 256, 32) and cls.shape == (2, 32)
    assert patch.dtype == cls.dtype == torch.float32
    with torch.no_grad():
        tokens = model.forward_features(hand_preprocess(batch, 224, *IMAGENET))  # (2, 257, 32)
    assert tokens.shape == (2, 257, 32)
    torch.testing.assert_close(patch, tokens[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(cls, tokens[:, 0], rtol=0, atol=0)
    # Final norm applied: each token is layer-normalised (then scaled by the norm's weights).
    with torch.no_grad():
        embedded = model._pos_embed(model.patch_embed(hand_preprocess(batch, 224, *IMAGENET)))
        normed = model.norm(model.blocks(embedded))  # (2, 257, 32)
    torch.testing.assert_close(patch, normed[:, 1:])


def test_tiny_is_reproducible(tiny: tuple[TeacherSpec, torch.nn.Module]) -> None:
    spec, model = tiny
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    again = load_teacher(spec, 256)
    torch.testing.assert_close(torch.rand(2), expected)  # global RNG untouched
    assert state_dict_sha256(again) == state_dict_sha256(model)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_tiny_at_512() -> None:
    spec = get_teacher("tiny")
    model = load_teacher(spec, 512)
    patch, cls = encode_images(model, spec, images(1, 512), 512)
    assert patch.shape == (1, 1024, 32) and cls.shape == (1, 32)


def test_tiny_metadata(tiny: tuple[TeacherSpec, torch.nn.Module]) -> None:
    spec, model = tiny
    assert teacher_metadata(spec, 256) == {
        "name": "tiny",
        "timm_id": spec.timm_id,
        "checkpoint": None,
        "tiny": True,
        "mean": list(IMAGENET[0]),
        "std": list(IMAGENET[1]),
        "input_size": 224,
        "interpolation": "bicubic",
        "antialias": False,
        "patch_size": 14,
        "grid": 16,
        "num_tokens": 256,
        "dim": 32,
        "num_prefix_tokens": 1,
        "token_rule": "final-norm patch tokens; CLS stored separately; register tokens dropped",
        "description": spec.description,
        "precision": "fp32",
    }
    # The geometry it describes without weights is the loaded model's.
    patch, cls = encode_images(model, spec, images(1, 256), 256)
    assert patch.shape == (1, 256, 32) and cls.shape == (1, 32)


def test_metadata_needs_no_weights() -> None:
    """A real teacher is described from its architecture alone (no download, no memory)."""
    spec = get_teacher("dinov2-vit-b-reg")
    meta = teacher_metadata(spec, 512, checkpoint="/x/dinov2.pth", precision="bf16")
    assert (meta["input_size"], meta["grid"], meta["num_tokens"]) == (448, 32, 1024)
    assert (meta["dim"], meta["num_prefix_tokens"]) == (768, 5)  # CLS + 4 registers
    assert (meta["checkpoint"], meta["precision"]) == ("/x/dinov2.pth", "bf16")
    assert teacher_geometry(get_teacher("tiny-reg"), 256) == (48, 5)


def test_token_count_mismatch_is_reported(tiny: tuple[TeacherSpec, torch.nn.Module]) -> None:
    spec, model = tiny
    wrong = TeacherSpec(
        name="wrong", timm_id="x", mean=spec.mean, std=spec.std, patch_size=7, resize_base=224
    )
    with pytest.raises(ValueError, match="returned 256 patch tokens .* expected 32x32 = 1024"):
        encode_images(model, wrong, images(1, 256), 256)


def test_real_size_dinov2_with_registers() -> None:
    spec = get_teacher("dinov2-vit-b-reg")
    model = load_teacher(spec, 256, pretrained=False)
    assert model.num_prefix_tokens == 5  # CLS + 4 registers
    patch, cls = encode_images(model, spec, images(1, 256, seed=6), 256)
    assert patch.shape == (1, 256, 768) and cls.shape == (1, 768)
    with torch.no_grad():
        tokens = model.forward_features(preprocess(spec, images(1, 256, seed=6), 256))
    assert tokens.shape == (1, 261, 768)
    torch.testing.assert_close(patch, tokens[:, 5:], rtol=0, atol=0)  # registers dropped
    torch.testing.assert_close(cls, tokens[:, 0], rtol=0, atol=0)


def test_local_checkpoint_is_loaded_and_resampled(tmp_path: Path) -> None:
    """A checkpoint saved at DINOv2's native 518 px loads at 224 px (pos. embedding resampled)."""
    spec = get_teacher("dinov2-vit-s")
    source = timm.create_model(spec.timm_id, pretrained=False, num_classes=0)
    with torch.no_grad():
        source.blocks[0].attn.qkv.weight.fill_(0.25)
    assert source.pos_embed.shape == (1, 1 + 37 * 37, 384)
    path = tmp_path / "dinov2_s.pth"
    torch.save(source.state_dict(), path)
    model = load_teacher(spec, 256, checkpoint=str(path))
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert (model.blocks[0].attn.qkv.weight == 0.25).all()
    torch.testing.assert_close(model.blocks[5].mlp.fc2.weight, source.blocks[5].mlp.fc2.weight)


def test_missing_checkpoint(tmp_path: Path) -> None:
    spec = get_teacher("dinov2-vit-s")
    missing = tmp_path / "nope.pth"
    with pytest.raises(UsageError) as info:
        load_teacher(spec, 256, checkpoint=str(missing))
    assert str(info.value) == (
        f"cannot load teacher 'dinov2-vit-s' (vit_small_patch14_dinov2.lvd142m): "
        f"no such checkpoint file {missing}{LOAD_SUFFIX}"
    )


@pytest.mark.usefixtures("hf_offline")
def test_pretrained_offline_is_a_usage_error() -> None:
    spec = get_teacher("dinov2-vit-s")
    with pytest.raises(UsageError) as info:
        load_teacher(spec, 256, pretrained=True)
    message = str(info.value)
    assert message.startswith(
        "cannot load teacher 'dinov2-vit-s' (vit_small_patch14_dinov2.lvd142m): "
    )
    assert message.endswith(LOAD_SUFFIX)
    assert "\n" not in message


def test_tiny_takes_no_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="takes no checkpoint"):
        load_teacher(get_teacher("tiny"), 256, checkpoint=str(tmp_path / "x.pth"))
