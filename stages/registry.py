"""The teacher registry: each preset's model id and preprocessing, as plain data.

It imports neither torch nor timm, so that a command checks a teacher's name within a second of
starting; :mod:`repa_cache.stages.teachers` loads and runs the models.
"""

from __future__ import annotations

from dataclasses import dataclass

from repa_cache.cache.errors import UsageError, unknown_name

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

TOKEN_RULE = "final-norm patch tokens; CLS stored separately; register tokens dropped"
POOLED_TOKEN_RULE = "final-norm patch tokens; no CLS token: the model's pooled output stored as cls; register tokens dropped"
INTERPOLATION = "bicubic"
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
ANTIALIAS = False
#: Prefix of teacher names that are timm model ids (``timm:vit_base_patch16_224.dino``).
TIMM_PREFIX = "timm:"
SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


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
        interpolation: Resize mode (``bicubic``, ``bilinear`` or ``nearest``; torch's
            ``F.interpolate``, no antialias).
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
    interpolation: str = INTERPOLATION


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
    # REPA's other encoders, as timm ships them (timm has no MoCo v3 and no MAE ViT-L/16).
    TeacherSpec(
        name="dinov1-vit-b",
        timm_id="vit_base_patch16_224.dino",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=16,
        resize_base=224,
        description="DINO (v1) ViT-B/16 at 224 px for 256 px crops (dim 768)",
    ),
    TeacherSpec(
        name="jepa-vit-h",
        timm_id="vit_huge_patch14_gap_224.in1k_ijepa",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=14,
        resize_base=224,
        description="I-JEPA ViT-H/14 (ImageNet-1k), no CLS: its average pool as cls (dim 1280)",
    ),
    TeacherSpec(
        name="siglip-vit-b",
        timm_id="vit_base_patch16_siglip_256.webli",
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
        patch_size=16,
        resize_base=256,
        description="SigLIP ViT-B/16 image tower at 256 px, no CLS: its attention pool as cls (dim 768)",
    ),
    TeacherSpec(
        name="dinov3-vit-b",
        timm_id="vit_base_patch16_dinov3.lvd1689m",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=16,
        resize_base=256,
        description="DINOv3 ViT-B/16 with 4 registers at 256 px (dim 768)",
    ),
    TeacherSpec(
        name="dinov3-vit-l",
        timm_id="vit_large_patch16_dinov3.lvd1689m",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch_size=16,
        resize_base=256,
        description="DINOv3 ViT-L/16 with 4 registers at 256 px (dim 1024)",
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


def check_teacher_name(name: str) -> None:
    """Refuse a name that is neither a registry name nor ``timm:MODEL_ID`` (one line, with the
    closest registry name when one is close); whether a timm id is a usable ViT needs timm."""
    if name.startswith(TIMM_PREFIX):
        if not name[len(TIMM_PREFIX):].strip():
            raise UsageError(f"teacher '{name}' names no timm model: timm:MODEL_ID, e.g. timm:vit_base_patch16_224.dino")
        return
    if name not in TEACHERS:
        raise unknown_name("teacher", name, sorted(TEACHERS), more=", or timm:MODEL_ID")


__all__ = ["ANTIALIAS", "INTERPOLATION", "INTERPOLATIONS", "POOLED_TOKEN_RULE", "TEACHERS", "TIMM_PREFIX", "TOKEN_RULE", "TeacherSpec",
           "check_teacher_name"]
