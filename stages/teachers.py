"""Teacher vision transformers of stage one: a small registry, loading and feature extraction.

Each teacher is a timm ViT with its own preprocessing. Following the public REPA code, pixels go
to ``[0, 1]``, are resized bicubically (no antialias) to the teacher's input size and normalised
with the teacher's mean / std. The stored features are the final-norm patch tokens (DINOv2's
``x_norm_patchtokens``) plus the CLS token, both raw (not L2-normalised); register tokens are
dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from repa_cache.cache.errors import UsageError

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

TOKEN_RULE = "final-norm patch tokens; CLS stored separately; register tokens dropped"
INTERPOLATION = "bicubic"
ANTIALIAS = False


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher and its preprocessing.

    Attributes:
        name: Registry name (``dinov2-vit-b`` ...).
        timm_id: timm model name with its pretrained tag.
        mean: Per-channel normalisation mean (pixels in ``[0, 1]``).
        std: Per-channel normalisation std.
        patch_size: ViT patch size in pixels.
        resize_base: Input side at 256 px; the input side is ``resize_base * resolution // 256``
            (DINOv2: 224 at 256 px, 448 at 512 px).
        fixed_size: Input side whatever the resolution (CLIP: 224). With neither ``resize_base``
            nor ``fixed_size`` the crop goes in unresized (MAE).
        tiny: A small random-initialised stand-in for tests and demos.
        description: One line for listings.
    """

    name: str
    timm_id: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    resize_base: int | None
    fixed_size: int | None = None
    tiny: bool = False
    description: str = ""


def _dinov2(name: str, timm_id: str, description: str) -> TeacherSpec:
    return TeacherSpec(
        name=name,
        timm_id=timm_id,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=14,
        resize_base=224,
        description=description,
    )


_REGISTRY: tuple[TeacherSpec, ...] = (
    _dinov2("dinov2-vit-s", "vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14 (dim 384)"),
    _dinov2("dinov2-vit-b", "vit_base_patch14_dinov2.lvd142m", "DINOv2 ViT-B/14 (dim 768)"),
    _dinov2("dinov2-vit-l", "vit_large_patch14_dinov2.lvd142m", "DINOv2 ViT-L/14 (dim 1024)"),
    _dinov2("dinov2-vit-g", "vit_giant_patch14_dinov2.lvd142m", "DINOv2 ViT-g/14 (dim 1536)"),
    _dinov2(
        "dinov2-vit-s-reg",
        "vit_small_patch14_reg4_dinov2.lvd142m",
        "DINOv2 ViT-S/14 with 4 registers (dim 384)",
    ),
    _dinov2(
        "dinov2-vit-b-reg",
        "vit_base_patch14_reg4_dinov2.lvd142m",
        "DINOv2 ViT-B/14 with 4 registers (dim 768)",
    ),
    _dinov2(
        "dinov2-vit-l-reg",
        "vit_large_patch14_reg4_dinov2.lvd142m",
        "DINOv2 ViT-L/14 with 4 registers (dim 1024)",
    ),
    _dinov2(
        "dinov2-vit-g-reg",
        "vit_giant_patch14_reg4_dinov2.lvd142m",
        "DINOv2 ViT-g/14 with 4 registers (dim 1536)",
    ),
    TeacherSpec(
        name="clip-vit-l",
        timm_id="vit_large_patch14_clip_224.openai",
        mean=CLIP_MEAN,
        std=CLIP_STD,
        patch_size=14,
        resize_base=None,
        fixed_size=224,
        description="OpenAI CLIP ViT-L/14 image tower at 224 px (dim 1024)",
    ),
    TeacherSpec(
        name="mae-vit-b",
        timm_id="vit_base_patch16_224.mae",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=16,
        resize_base=None,
        description="MAE ViT-B/16, crop fed unresized (dim 768)",
    ),
    TeacherSpec(
        name="tiny",
        timm_id="tiny-random-vit",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=14,
        resize_base=224,
        tiny=True,
        description="random 2-block ViT (dim 32) with DINOv2 preprocessing, for tests and demos",
    ),
    TeacherSpec(
        name="tiny-reg",
        timm_id="tiny-random-vit-reg4",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=14,
        resize_base=224,
        tiny=True,
        description="random 2-block ViT (dim 48) with 4 register tokens and DINOv2 preprocessing, for tests",
    ),
)

#: Known teachers by registry name.
TEACHERS: dict[str, TeacherSpec] = {spec.name: spec for spec in _REGISTRY}

_TINY_DEPTH = 2
_TINY_HEADS = 2
# Per tiny preset: (embedding dim, register tokens).
_TINY_SHAPES: dict[str, tuple[int, int]] = {"tiny": (32, 0), "tiny-reg": (48, 4)}


def get_teacher(name: str) -> TeacherSpec:
    """Look a teacher up by registry name.

    Raises:
        UsageError: the name is not in :data:`TEACHERS`.
    """
    try:
        return TEACHERS[name]
    except KeyError:
        known = ", ".join(sorted(TEACHERS))
        raise UsageError(f"unknown teacher '{name}'; known teachers: {known}") from None


def teacher_input_size(spec: TeacherSpec, resolution: int) -> int:
    """Side in pixels of the teacher's input for crops of ``resolution`` pixels.

    Raises:
        UsageError: the side is not a multiple of the teacher's patch size.
    """
    if spec.fixed_size is not None:
        size = spec.fixed_size
    elif spec.resize_base is not None:
        size = spec.resize_base * resolution // 256
    else:
        size = resolution
    if size <= 0 or size % spec.patch_size:
        raise UsageError(
            f"teacher '{spec.name}' needs an input side that is a multiple of its patch size "
            f"{spec.patch_size}; resolution {resolution} gives {size}"
        )
    return size


def token_grid(spec: TeacherSpec, resolution: int) -> int:
    """Side of the teacher's patch-token grid (16 for DINOv2 at 256 px)."""
    return teacher_input_size(spec, resolution) // spec.patch_size


def _build_tiny_teacher(name: str, img_size: int) -> VisionTransformer:
    """Build a tiny teacher with identical weights in every process (global RNG untouched)."""
    dim, registers = _TINY_SHAPES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return VisionTransformer(
            img_size=img_size,
            patch_size=14,
            embed_dim=dim,
            depth=_TINY_DEPTH,
            num_heads=_TINY_HEADS,
            num_classes=0,
            reg_tokens=registers,
        )


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0].rstrip(". ") if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def load_teacher(
    spec: TeacherSpec,
    resolution: int,
    device: str | torch.device = "cpu",
    pretrained: bool = True,
    checkpoint: str | None = None,
) -> torch.nn.Module:
    """Create a teacher for crops of ``resolution`` pixels, in eval mode with gradients off.

    The timm model is built at :func:`teacher_input_size` (timm resamples the position embedding of
    the pretrained weights to it) without a classifier head. Weights come from the Hugging Face hub
    through timm, or from a local ``checkpoint`` file (timm's ``pretrained_cfg_overlay``). The tiny
    teacher is random-initialised from a fixed seed and ignores ``pretrained``.

    Raises:
        UsageError: the weights cannot be loaded (no network, missing or unreadable checkpoint).
    """
    img_size = teacher_input_size(spec, resolution)
    if spec.tiny:
        if checkpoint is not None:
            raise UsageError(f"teacher '{spec.name}' is built from a seed and takes no checkpoint")
        model: torch.nn.Module = _build_tiny_teacher(spec.name, img_size)
    else:
        kwargs: dict[str, Any] = {"img_size": img_size, "num_classes": 0}
        try:
            if checkpoint is not None:
                if not Path(checkpoint).is_file():
                    raise FileNotFoundError(f"no such checkpoint file {checkpoint}")
                kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint)}
                pretrained = True
            model = timm.create_model(spec.timm_id, pretrained=pretrained, **kwargs)
        except Exception as exc:
            raise UsageError(
                f"cannot load teacher '{spec.name}' ({spec.timm_id}): {_short_reason(exc)}; "
                "timm fetches weights from the Hugging Face hub, or point --teacher-checkpoint "
                "at a local file"
            ) from exc
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    logger.info(
        "loaded teacher %s (%s) at %d px on %s%s",
        spec.name,
        spec.timm_id,
        img_size,
        device,
        "" if pretrained or spec.tiny else " with random weights",
    )
    return model


def preprocess(spec: TeacherSpec, images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Turn uint8 crops into the teacher's input, as the public REPA code does.

    Pixels are scaled to ``[0, 1]`` in float32, resized to :func:`teacher_input_size` with bicubic
    interpolation (``align_corners=False``, no antialias; skipped when the size already matches)
    and normalised with the teacher's mean / std. The result stays on the images' device.

    Args:
        images: uint8 ``(B, 3, resolution, resolution)``.

    Returns:
        float32 ``(B, 3, S, S)`` with ``S = teacher_input_size(spec, resolution)``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    if images.shape[-2:] != (resolution, resolution):
        raise ValueError(
            f"expected {resolution}x{resolution} crops, got {images.shape[-2]}x{images.shape[-1]}"
        )
    size = teacher_input_size(spec, resolution)
    x = images.float() / 255.0  # (B, 3, H, W)
    if size != resolution:
        x = F.interpolate(
            x, size=(size, size), mode=INTERPOLATION, align_corners=False, antialias=ANTIALIAS
        )  # (B, 3, S, S)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std  # (B, 3, S, S)


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def encode_images(
    model: torch.nn.Module, spec: TeacherSpec, images: torch.Tensor, resolution: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a teacher on uint8 crops.

    Args:
        model: A teacher from :func:`load_teacher`.
        images: uint8 ``(B, 3, resolution, resolution)`` on any device.

    Returns:
        ``(patch, cls)`` on the model's device: float32 final-norm patch tokens ``(B, T, D)`` with
        ``T = token_grid(spec, resolution) ** 2``, and the float32 CLS token ``(B, D)``. Register
        tokens are dropped.

    Raises:
        ValueError: the model returns a token count other than the expected grid.
    """
    device, dtype = _model_device_dtype(model)
    with torch.no_grad():
        x = preprocess(spec, images.to(device), resolution).to(dtype)  # (B, 3, S, S)
        tokens = model.forward_features(x)  # type: ignore[operator]  # (B, P + T, D), final norm applied
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        patch = tokens[:, prefix:].float()  # (B, T, D)
        cls = tokens[:, 0].float()  # (B, D)
    grid = token_grid(spec, resolution)
    if patch.shape[1] != grid * grid:
        raise ValueError(
            f"teacher '{spec.name}' returned {patch.shape[1]} patch tokens at {resolution} px; "
            f"expected {grid}x{grid} = {grid * grid}"
        )
    return patch, cls


def teacher_geometry(spec: TeacherSpec, resolution: int) -> tuple[int, int]:
    """(embedding dim, number of prefix tokens: CLS and registers) of a teacher, without loading
    its weights: a real model is built on the ``meta`` device (no memory), a tiny one for real."""
    size = teacher_input_size(spec, resolution)
    if spec.tiny:
        model = _build_tiny_teacher(spec.name, size)
    else:
        with torch.device("meta"):  # every registry teacher is a timm VisionTransformer
            model = cast(VisionTransformer, timm.create_model(spec.timm_id, pretrained=False, img_size=size, num_classes=0))
    return int(model.num_features), int(model.num_prefix_tokens)


def teacher_metadata(spec: TeacherSpec, resolution: int, checkpoint: str | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Describe a teacher for the cache metadata (JSON-friendly), without loading its weights:
    which model (timm id, local ``checkpoint`` if any), its preprocessing, its token geometry at
    ``resolution`` and the ``precision`` it runs in. The hash of the weights a worker actually
    loads is in every shard record instead."""
    dim, prefix = teacher_geometry(spec, resolution)
    grid = token_grid(spec, resolution)
    return {
        "name": spec.name,
        "timm_id": spec.timm_id,
        "checkpoint": checkpoint,
        "tiny": spec.tiny,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_size": teacher_input_size(spec, resolution),
        "interpolation": INTERPOLATION,
        "antialias": ANTIALIAS,
        "patch_size": spec.patch_size,
        "grid": grid,
        "num_tokens": grid * grid,
        "dim": dim,
        "num_prefix_tokens": prefix,
        "token_rule": TOKEN_RULE,
        "description": spec.description,
        "precision": precision,
    }
