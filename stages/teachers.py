"""Teacher vision transformers of stage one: a small registry, loading and feature extraction.

Each teacher is a timm ViT with its own preprocessing. Following the public REPA code, pixels go
to ``[0, 1]``, are resized (bicubic unless the model's pretrained config says otherwise, no
antialias) to the teacher's input size and normalised with the teacher's mean / std. The stored
features are the final-norm patch tokens (DINOv2's ``x_norm_patchtokens``) plus the CLS token,
both raw (not L2-normalised); register tokens are dropped. A model without a CLS token (SigLIP,
I-JEPA) stores its own pooled output (attention pool, average) in the CLS slot.

Besides the presets, ``timm:MODEL_ID`` names any timm ViT: its mean / std, input size and
interpolation come from the model's pretrained config (timm's ``resolve_data_config``), its input
side scales with the resolution as DINOv2's does in REPA (the pretrained side at 256 px).

Methods that align attention (HASTE) need more than the final tokens: with ``--teacher-layers A-B``
a group also stores the hidden tokens entering block A (CLS and register tokens first, then the
patch tokens), and the trainer runs blocks A..B of the same teacher on them
(:class:`TeacherTail`) to get each block's attention logits, instead of storing the maps.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from repa_cache.cache.errors import UsageError
from repa_cache.stages.registry import (  # noqa: F401 - the registry's names, also as this module's
    ANTIALIAS,
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATION,
    INTERPOLATIONS,
    POOLED_TOKEN_RULE,
    SIGLIP_MEAN,
    SIGLIP_STD,
    TEACHERS,
    TIMM_PREFIX,
    TOKEN_RULE,
    TeacherSpec,
    check_teacher_name,
)

logger = logging.getLogger(__name__)


_TINY_DEPTH = 2
_TINY_HEADS = 2
# Per tiny preset: (embedding dim, register tokens).
_TINY_SHAPES: dict[str, tuple[int, int]] = {"tiny": (32, 0), "tiny-reg": (48, 4)}


def get_teacher(name: str) -> TeacherSpec:
    """Look a teacher up by registry name, or build the spec of ``timm:MODEL_ID``.

    Raises:
        UsageError: the name is neither in :data:`TEACHERS` nor a usable timm ViT.
    """
    check_teacher_name(name)
    if name.startswith(TIMM_PREFIX):
        return timm_teacher(name[len(TIMM_PREFIX):])
    return TEACHERS[name]


def _has_class_token(model: torch.nn.Module) -> bool:
    return getattr(model, "cls_token", None) is not None


def _meta_model(timm_id: str, **kwargs: Any) -> torch.nn.Module:
    """A timm model built on the ``meta`` device: its architecture and config, no memory."""
    with torch.device("meta"):
        return timm.create_model(timm_id, pretrained=False, num_classes=0, **kwargs)


@functools.lru_cache(maxsize=64)
def timm_teacher(model_id: str) -> TeacherSpec:
    """The teacher spec of any timm ViT, its preprocessing read from its pretrained config.

    ``model_id`` is ``architecture[.pretrained_tag]`` (without a tag, timm's default one). The
    input side at 256 px is the pretrained input size, and scales with the resolution; mean, std
    and interpolation are timm's ``resolve_data_config`` of the model. Nothing is downloaded.

    Raises:
        UsageError: an unknown model or tag, or a model that is not a ViT with square patches and
            a square input, or an interpolation torch cannot apply.
    """
    from timm.data import resolve_data_config

    name = f"{TIMM_PREFIX}{model_id}"
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", model_id):
        raise UsageError(f"teacher '{name}': a timm model id is letters, digits, '_', '-' and '.'")
    arch, _, tag = model_id.partition(".")
    if not timm.is_model(arch):
        raise UsageError(f"teacher '{name}': timm has no model '{arch}' (see timm.list_models('*vit*'))")
    if tag and model_id not in timm.list_pretrained(model_id):
        tags = ", ".join(t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")) or "none"
        raise UsageError(f"teacher '{name}': timm model '{arch}' has no pretrained tag '{tag}' (tags: {tags})")
    try:
        model = _meta_model(model_id)
    except Exception as exc:
        raise UsageError(f"teacher '{name}': timm cannot build it: {_short_reason(exc)}") from exc
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None or not hasattr(model, "num_prefix_tokens") or not hasattr(model, "forward_features"):
        raise UsageError(f"teacher '{name}' is not a ViT (no patch embedding and token sequence); "
                         "a teacher must give patch tokens")
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
    cfg = resolve_data_config({}, model=model)
    _, height, width = cfg["input_size"]
    interpolation = str(cfg["interpolation"])
    if ph != pw or height != width:
        raise UsageError(f"teacher '{name}' has {ph}x{pw} patches and a {width}x{height} input; "
                         "only square ones are supported")
    if interpolation not in INTERPOLATIONS:
        raise UsageError(f"teacher '{name}': its pretrained config asks for '{interpolation}' resizing; "
                         f"supported: {', '.join(INTERPOLATIONS)}")
    default_tag = cast(dict[str, Any], getattr(model, "pretrained_cfg", None) or {}).get("tag")
    resolved = model_id if tag or not default_tag else f"{arch}.{default_tag}"
    cls = "CLS" if _has_class_token(model) else "pooled output as cls"
    return TeacherSpec(
        name=name,
        timm_id=resolved,
        mean=cast(tuple[float, float, float], tuple(float(v) for v in cfg["mean"])),
        std=cast(tuple[float, float, float], tuple(float(v) for v in cfg["std"])),
        patch_size=int(ph),
        resize_base=int(height),
        interpolation=interpolation,
        description=f"timm {resolved} ({type(model).__name__}, dim {model.num_features}, {cls}), "
                    f"preprocessing from its pretrained config",
    )


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
    checkpoint_option: str = "--teacher-checkpoint NAME=FILE",
) -> torch.nn.Module:
    """Create a teacher for crops of ``resolution`` pixels, in eval mode with gradients off.

    ``checkpoint_option`` is how the calling command takes a local weights file (named in the
    error when the weights cannot be loaded).

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
                "timm fetches weights from the Hugging Face hub (not with HF_HUB_OFFLINE=1 or without a network), "
                f"or give a local file with {checkpoint_option}"
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
            x, size=(size, size), mode=spec.interpolation,
            align_corners=None if spec.interpolation == "nearest" else False, antialias=ANTIALIAS,
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
        tokens are dropped; a model without a CLS token gives its pooled output instead.

    Raises:
        ValueError: the model returns a token count other than the expected grid.
    """
    return _encode_tokens(model, spec, images, resolution)[1:]


def _encode_tokens(model: torch.nn.Module, spec: TeacherSpec, images: torch.Tensor,
                   resolution: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`encode_images` with the final-norm tokens it cut them from: ``(tokens (B, P + T, D),
    patch, cls)``."""
    device, dtype = _model_device_dtype(model)
    with torch.no_grad():
        x = preprocess(spec, images.to(device), resolution).to(dtype)  # (B, 3, S, S)
        tokens = model.forward_features(x)  # type: ignore[operator]  # (B, P + T, D), final norm applied
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        patch = tokens[:, prefix:].float()  # (B, T, D): CLS and register tokens dropped
        if _has_class_token(model):
            cls = tokens[:, 0].float()  # (B, D)
        else:  # SigLIP's attention pool, I-JEPA's average: the model's own summary
            cls = model.forward_head(tokens, pre_logits=True).float()  # type: ignore[operator]  # (B, D)
    grid = token_grid(spec, resolution)
    if patch.shape[1] != grid * grid:
        raise ValueError(
            f"teacher '{spec.name}' returned {patch.shape[1]} patch tokens at {resolution} px; "
            f"expected {grid}x{grid} = {grid * grid}"
        )
    return tokens, patch, cls


def _geometry(spec: TeacherSpec, resolution: int) -> tuple[int, int, bool]:
    """(embedding dim, prefix tokens, has a CLS token) of a teacher without loading its weights:
    a real model is built on the ``meta`` device (no memory), a tiny one for real."""
    model = _shape_model(spec, resolution)
    info = cast(Any, model)
    return int(info.num_features), int(info.num_prefix_tokens), _has_class_token(model)


def _shape_model(spec: TeacherSpec, resolution: int) -> torch.nn.Module:
    """The teacher's architecture without its weights (meta device; the tiny one for real)."""
    size = teacher_input_size(spec, resolution)
    return _build_tiny_teacher(spec.name, size) if spec.tiny else _meta_model(spec.timm_id, img_size=size)


def teacher_geometry(spec: TeacherSpec, resolution: int) -> tuple[int, int]:
    """(embedding dim, number of prefix tokens: CLS and registers) of a teacher, without loading
    its weights: a real model is built on the ``meta`` device (no memory), a tiny one for real."""
    dim, prefix, _ = _geometry(spec, resolution)
    return dim, prefix


def teacher_metadata(spec: TeacherSpec, resolution: int, checkpoint: str | None = None, precision: str = "fp32",
                     layers: tuple[int, int | None] | None = None, registers: bool = False) -> dict[str, Any]:
    """Describe a teacher for the cache metadata (JSON-friendly), without loading its weights:
    which model (timm id, local ``checkpoint`` if any), its preprocessing, its token geometry at
    ``resolution`` and the ``precision`` it runs in. The hash of the weights a worker actually
    loads is in every shard record instead. With ``layers`` (first, last block, 1-based) the group
    also stores the hidden tokens entering block ``first`` (:func:`hidden_metadata`); with
    ``registers`` a teacher that has register tokens also stores them (final norm applied)."""
    dim, prefix, has_cls = _geometry(spec, resolution)
    grid = token_grid(spec, resolution)
    extra: dict[str, Any] = {"hidden": hidden_metadata(spec, resolution, layers)} if layers is not None else {}
    num_registers = prefix - int(has_cls)
    if registers and num_registers > 0:
        extra["registers"] = {"num_tokens": num_registers}
    return {
        "name": spec.name,
        "timm_id": spec.timm_id,
        "checkpoint": checkpoint,
        "tiny": spec.tiny,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_size": teacher_input_size(spec, resolution),
        "interpolation": spec.interpolation,
        "antialias": ANTIALIAS,
        "patch_size": spec.patch_size,
        "grid": grid,
        "num_tokens": grid * grid,
        "dim": dim,
        "num_prefix_tokens": prefix,
        "token_rule": TOKEN_RULE if has_cls else POOLED_TOKEN_RULE,
        "description": spec.description,
        "precision": precision,
    } | extra


# ------------------------------------------------------------------------------------------------
# hidden tokens and attention logits (--teacher-layers; HASTE)

HIDDEN_RULE = "tokens entering block first_block (1-based): prefix (CLS, registers) then patch tokens, before norm1"


def parse_layers(text: str) -> tuple[int, int | None]:
    """``"9"`` or ``"9-12"`` -> (first, last or None), 1-based blocks.

    Raises:
        UsageError: not one block number or a ``FIRST-LAST`` range of them.
    """
    m = re.fullmatch(r"\s*(\d{1,4})\s*(?:-\s*(\d{1,4})\s*)?", text)
    if not m:
        raise UsageError(f"--teacher-layers takes FIRST or FIRST-LAST (1-based block numbers, e.g. 9-12), not '{text}'")
    first, last = int(m.group(1)), int(m.group(2)) if m.group(2) else None
    if last is not None and last < first:
        raise UsageError(f"--teacher-layers {first}-{last} runs backwards; give FIRST-LAST with FIRST <= LAST (e.g. {last}-{first})")
    return first, last


def _check_readable(spec: TeacherSpec, model: torch.nn.Module) -> int:
    """The teacher's depth; UsageError when its attention logits cannot be read from its blocks."""
    blocks = getattr(model, "blocks", None)
    if not (isinstance(model, VisionTransformer) and isinstance(blocks, nn.Sequential)
            and all(type(b) is Block and type(b.attn) is Attention for b in blocks)):
        raise UsageError(f"teacher '{spec.name}' ({type(model).__name__}) has blocks whose attention logits cannot be read "
                         "here; --teacher-layers supports timm VisionTransformer teachers (DINOv2, CLIP, MAE, SigLIP, DINO)")
    return len(blocks)


def hidden_metadata(spec: TeacherSpec, resolution: int, layers: tuple[int, int | None]) -> dict[str, Any]:
    """What a group with hidden tokens records: the blocks a trainer runs on them (``first_block``
    to ``last_block``, 1-based, inclusive; by default to the teacher's last block), the teacher's
    depth and heads, and the stored token count (prefix + patch tokens).

    Raises:
        UsageError: blocks outside the teacher, or a teacher whose attention cannot be read.
    """
    model = _shape_model(spec, resolution)
    depth = _check_readable(spec, model)
    first, last = layers[0], layers[1] if layers[1] is not None else depth
    if not 1 <= first <= last <= depth:
        given = f"{first}-{layers[1]}" if layers[1] is not None else f"{first}"
        raise UsageError(f"--teacher-layers {given} is outside the blocks 1..{depth} of teacher '{spec.name}'")
    info = cast(Any, model)
    attn = cast(Attention, info.blocks[0].attn)
    return {
        "first_block": first,
        "last_block": last,
        "depth": depth,
        "heads": int(attn.num_heads),
        "num_tokens": int(info.num_prefix_tokens) + token_grid(spec, resolution) ** 2,
        "rule": HIDDEN_RULE,
    }


@contextlib.contextmanager
def _block_input(model: torch.nn.Module, block: int) -> Iterator[list[Tensor]]:
    """Collect the input of ``model.blocks[block - 1]`` (1-based) while the context is open."""
    seen: list[Tensor] = []
    blocks = cast(nn.Sequential, cast(Any, model).blocks)
    handle = blocks[block - 1].register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        yield seen
    finally:
        handle.remove()


def encode_images_hidden(model: torch.nn.Module, spec: TeacherSpec, images: torch.Tensor, resolution: int,
                         first_block: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`encode_images` plus the hidden tokens entering block ``first_block`` (1-based) of the
    same forward pass: ``(patch, cls, hidden)``, hidden float32 (B, P + T, D) with the prefix
    tokens (CLS, registers) first."""
    with _block_input(model, first_block) as seen:
        patch, cls = encode_images(model, spec, images, resolution)
    return patch, cls, seen[0].float()


#: The arrays a teacher group can hold, each computed from one forward pass by :func:`encode_arrays`.
TEACHER_OUTPUTS = ("patch", "cls", "hidden", "registers")


def encode_arrays(model: torch.nn.Module, spec: TeacherSpec, images: torch.Tensor, resolution: int, names: Sequence[str],
                  record: Mapping[str, Any]) -> dict[str, Tensor]:
    """The arrays ``names`` of a teacher group (its metadata ``record``: for ``hidden``, the block
    its tokens enter) for a batch of crops, float32 from one forward pass: ``patch`` (B, T, D),
    ``cls`` (B, D), ``hidden`` (B, P + T, D), ``registers`` (B, R, D), the final-norm register
    tokens."""
    unknown = [n for n in names if n not in TEACHER_OUTPUTS]
    if unknown:
        raise ValueError(f"a teacher group cannot hold {', '.join(unknown)} (known arrays: {', '.join(TEACHER_OUTPUTS)})")
    hook: contextlib.AbstractContextManager[list[Tensor]] = (
        _block_input(model, int(record["hidden"]["first_block"])) if "hidden" in names else contextlib.nullcontext([]))
    with hook as seen:
        tokens, patch, cls = _encode_tokens(model, spec, images, resolution)
    produced = {"patch": patch, "cls": cls}
    if "hidden" in names:
        produced["hidden"] = seen[0]
    if "registers" in names:
        prefix, first = int(getattr(model, "num_prefix_tokens", 1)), int(_has_class_token(model))
        produced["registers"] = tokens[:, first:prefix]  # (B, R, D): after the CLS token, before the patches
    return {n: produced[n].float() for n in names}


def attention_logits(block: torch.nn.Module, h: Tensor) -> Tensor:
    """Pre-softmax attention logits ``q k^T / sqrt(d)`` of a timm ViT block on its input tokens
    h (B, N, D): (B, heads, N, N), with the block's own q/k norms."""
    blk = cast(Block, block)
    attn = cast(Attention, blk.attn)
    B, N, _ = h.shape
    qkv = attn.qkv(blk.norm1(h)).reshape(B, N, 3, attn.num_heads, attn.head_dim)  # (B, N, 3, H, K)
    q, k, _v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, K)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, N, N)


class TeacherTail(nn.Module):
    """Blocks ``first..last`` (1-based) of a loaded teacher, run on its cached hidden tokens.

    ``forward(hidden)`` gives each block's patch-to-patch attention logits (the CLS and register
    rows and columns removed), (B, heads, T, T) each, without gradients. The blocks are the
    teacher's own modules (frozen); nothing after block ``last`` runs.
    """

    def __init__(self, model: torch.nn.Module, first: int, last: int) -> None:
        super().__init__()
        info = cast(Any, model)
        depth = len(info.blocks)
        if not 1 <= first <= last <= depth:
            raise UsageError(f"teacher blocks {first}-{last} are outside the teacher's blocks 1..{depth}")
        self.blocks = nn.ModuleList(info.blocks[first - 1:last])
        self.prefix = int(info.num_prefix_tokens)
        self.first, self.last = first, last
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, hidden: Tensor) -> list[Tensor]:
        """hidden (B, P + T, D) -> one (B, heads, T, T) logits tensor per block."""
        h = hidden.to(next(self.parameters()).dtype)
        out = []
        for i, block in enumerate(self.blocks):
            out.append(attention_logits(block, h)[:, :, self.prefix:, self.prefix:])  # (B, heads, T, T)
            if i + 1 < len(self.blocks):
                h = block(h)  # (B, P + T, D)
        return out
