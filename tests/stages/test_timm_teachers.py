"""Teachers named by timm id and the presets of REPA's other encoders: preprocessing read from
timm's pretrained configs, token handling on tiny random-initialised members of each family, and a
cache written with one of them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config

from repa_cache.cache.errors import UsageError
from repa_cache.cache.reader import CacheReader
from repa_cache.pipeline.precompute import precompute
from repa_cache.stages.images import decode_and_crop
from repa_cache.stages.teachers import (
    POOLED_TOKEN_RULE,
    TEACHERS,
    TOKEN_RULE,
    encode_images,
    get_teacher,
    load_teacher,
    teacher_input_size,
    teacher_metadata,
    timm_teacher,
    token_grid,
)

from ..conftest import tiny_config

# Preset -> (timm id, input side and token grid at 256 px) of REPA's other encoders.
PRESETS = {
    "dinov1-vit-b": ("vit_base_patch16_224.dino", 224, 14),
    "jepa-vit-h": ("vit_huge_patch14_gap_224.in1k_ijepa", 224, 16),
    "siglip-vit-b": ("vit_base_patch16_siglip_256.webli", 256, 16),
    "dinov3-vit-b": ("vit_base_patch16_dinov3.lvd1689m", 256, 16),
    "dinov3-vit-l": ("vit_large_patch16_dinov3.lvd1689m", 256, 16),
}
# One member of each family for the tiny builds: (timm id, prefix tokens, CLS token?).
FAMILIES = {
    "dinov1": ("vit_base_patch16_224.dino", 1, True),
    "mae": ("vit_base_patch16_224.mae", 1, True),
    "ijepa": ("vit_huge_patch14_gap_224.in1k_ijepa", 0, False),
    "siglip": ("vit_base_patch16_siglip_256.webli", 0, False),
    "dinov3": ("vit_base_patch16_dinov3.lvd1689m", 5, True),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2.lvd142m", 5, True),
    "clip": ("vit_base_patch16_clip_224.openai", 1, True),
}


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def _tiny(timm_id: str, img_size: int) -> Any:
    """A 2-block, 64-wide random member of the model's family (no download)."""
    torch.manual_seed(0)
    model = timm.create_model(timm_id, pretrained=False, img_size=img_size, depth=2, embed_dim=64, num_heads=2,
                              num_classes=0)
    return model.eval()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_what_timm_says(name: str) -> None:
    """Each preset's preprocessing equals the one ``timm:ID`` reads from the pretrained config."""
    timm_id, side, grid = PRESETS[name]
    spec, derived = TEACHERS[name], get_teacher(f"timm:{timm_id}")
    assert spec.timm_id == derived.timm_id == timm_id
    for field in ("mean", "std", "patch_size", "resize_base", "interpolation"):
        assert getattr(spec, field) == getattr(derived, field), field
    assert teacher_input_size(spec, 256) == side and teacher_input_size(spec, 512) == 2 * side
    assert token_grid(spec, 256) == grid


def test_timm_spec_reads_the_pretrained_config() -> None:
    spec = get_teacher("timm:vit_base_patch16_siglip_256.webli")
    cfg = timm.models.get_pretrained_cfg("vit_base_patch16_siglip_256.webli")
    assert cfg is not None
    assert (spec.mean, spec.std, spec.interpolation) == (tuple(cfg.mean), tuple(cfg.std), cfg.interpolation)
    assert (spec.name, spec.patch_size, spec.resize_base, spec.tiny) == (
        "timm:vit_base_patch16_siglip_256.webli", 16, cfg.input_size[1], False)
    assert timm_teacher("vit_base_patch16_siglip_256.webli") is spec  # built once per process
    # Without a tag, timm's default pretrained tag is recorded.
    default = get_teacher("timm:vit_small_patch16_224")
    assert default.timm_id.startswith("vit_small_patch16_224.") and timm.list_pretrained(default.timm_id) == [default.timm_id]
    # DINOv1 at 256 px: 224 px input, a 14x14 grid; at 512 px: 448 px, 28x28.
    dino = get_teacher("timm:vit_base_patch16_224.dino")
    assert (token_grid(dino, 256), token_grid(dino, 512)) == (14, 28)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("timm:no_such_vit", "teacher 'timm:no_such_vit': timm has no model 'no_such_vit' (see timm.list_models('*vit*'))"),
        ("timm:vit_base_patch16_224.nosuchtag", "teacher 'timm:vit_base_patch16_224.nosuchtag': timm model "
         "'vit_base_patch16_224' has no pretrained tag 'nosuchtag' (tags: "),
        ("timm:convnext_tiny.fb_in1k", "teacher 'timm:convnext_tiny.fb_in1k' is not a ViT (no patch embedding and "
         "token sequence); a teacher must give patch tokens"),
        ("timm:../x", "teacher 'timm:../x': a timm model id is letters, digits, '_', '-' and '.'"),
    ],
)
def test_unusable_timm_ids_are_refused_in_one_line(name: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        get_teacher(name)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_a_resolution_off_the_patch_grid_is_refused() -> None:
    with pytest.raises(UsageError, match="teacher 'timm:vit_base_patch16_224.dino' needs an input side that is a "
                       "multiple of its patch size 16; resolution 264 gives 231"):
        token_grid(get_teacher("timm:vit_base_patch16_224.dino"), 264)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_member_of_each_family_gives_patch_tokens_and_cls(family: str) -> None:
    timm_id, prefix, has_cls = FAMILIES[family]
    spec = get_teacher(f"timm:{timm_id}")
    side, grid = teacher_input_size(spec, 256), token_grid(spec, 256)
    model = _tiny(timm_id, side)
    assert model.num_prefix_tokens == prefix
    images = _images(2, 256)
    patch, cls = encode_images(model, spec, images, 256)
    assert patch.shape == (2, grid * grid, 64) and cls.shape == (2, 64)
    # By hand: timm's own preprocessing numbers, the final-norm tokens without CLS and registers.
    cfg = resolve_data_config({}, model=model)
    x = images.float() / 255
    if side != 256:
        x = F.interpolate(x, size=side, mode=cfg["interpolation"], align_corners=False)
    x = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, prefix + T, D)
        pooled = model.forward_head(tokens, pre_logits=True)  # (B, D)
    assert tokens.shape[1] == prefix + grid * grid
    torch.testing.assert_close(patch, tokens[:, prefix:], rtol=0, atol=0)
    torch.testing.assert_close(cls, tokens[:, 0] if has_cls else pooled, rtol=0, atol=0)
    meta = teacher_metadata(spec, 256)  # of the full-size model, built on the meta device
    with torch.device("meta"):
        full = timm.create_model(timm_id, pretrained=False, num_classes=0, img_size=side)
    assert (meta["dim"], meta["num_prefix_tokens"], meta["num_tokens"]) == (full.num_features, prefix, grid * grid)
    assert meta["token_rule"] == (TOKEN_RULE if has_cls else POOLED_TOKEN_RULE)
    assert meta["interpolation"] == cfg["interpolation"] and meta["mean"] == list(cfg["mean"])


def test_a_model_giving_another_grid_is_refused() -> None:
    """DINOv3 takes any input size (16 px patches): fed as a 14 px-patch teacher expects, it gives
    a 14x14 grid where 16x16 is needed, and the count check names both."""
    spec = get_teacher("dinov2-vit-b")
    model = _tiny("vit_base_patch16_dinov3.lvd1689m", 224)
    with pytest.raises(ValueError, match=r"^teacher 'dinov2-vit-b' returned 196 patch tokens at 256 px; "
                       r"expected 16x16 = 256$"):
        encode_images(model, spec, _images(1, 256), 256)


TINY_DINOV3 = "vit_tiny_patch16_dinov3_qkvb.eupe_lvd1689m"  # the smallest DINOv3 (5.5M parameters)


def test_precompute_with_a_timm_teacher_writes_its_tokens(demo_images: Path, tmp_path: Path) -> None:
    """A cache from ``--teacher timm:ID`` with local weights (random here): registers dropped,
    tokens equal to the model's own on the same crops."""
    name = f"timm:{TINY_DINOV3}"
    torch.manual_seed(0)
    weights = tmp_path / "dinov3-tiny.pth"
    torch.save(timm.create_model(TINY_DINOV3, pretrained=False, num_classes=0).state_dict(), weights)
    out = tmp_path / "cache"
    res = precompute(tiny_config(demo_images, out, teachers=(name,), teacher_checkpoints={name: str(weights)}))
    assert res.groups[f"teachers/{name}"] == "written"
    reader = CacheReader(out, groups=[name])
    meta = reader.group(name).meta.model
    assert (meta["timm_id"], meta["num_tokens"], meta["dim"], meta["num_prefix_tokens"], meta["input_size"]) == (
        TINY_DINOV3, 256, 192, 5, 256)
    start, stop = reader.meta.shard_range(0)
    idx, crops = [], []
    for i in range(start, stop):
        crop = decode_and_crop((demo_images / reader.keys[i]).read_bytes(), 256).image
        if crop is not None:
            idx.append(i)
            crops.append(crop)
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    spec = get_teacher(name)
    model = load_teacher(spec, 256, checkpoint=str(weights))
    patch, cls = encode_images(model, spec, images, 256)
    got = reader.read(np.array(idx))
    np.testing.assert_array_equal(got[f"teachers/{name}/patch"][:, 0], patch.half().numpy())
    np.testing.assert_array_equal(got[f"teachers/{name}/cls"][:, 0], cls.half().numpy())
    shutil.rmtree(out)
