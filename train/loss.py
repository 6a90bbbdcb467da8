"""The REPA projection loss, and explicit resampling of a teacher token grid.

REPA aligns the student's projected hidden tokens to a frozen teacher's patch tokens with a
negative cosine similarity per token. The training step (:mod:`repa_cache.train.step`) adds it to the denoising loss:
``total = denoise + proj_coeff * repa`` (proj_coeff 0.5 in the recipe).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


def repa_loss(zs: Sequence[Tensor], targets: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """Mean negative cosine similarity between projected tokens and teacher tokens.

    For each teacher, ``-cos(normalize(z), normalize(y))`` is averaged over tokens and samples; the
    result is the mean over teachers. The computation is in fp32 with autocast off whatever the
    input dtype (fp16 normalisation of large features overflows to inf/NaN). Targets are
    detached: only the projected tokens receive gradient.

    Args:
        zs: one (B, T, D) projector output per teacher.
        targets: one (B, T, D) teacher feature tensor per teacher, in the same order.

    Returns:
        ``(loss, cos_per_teacher)``: the scalar loss and, for logging, the detached mean cosine
        of each teacher.
    """
    if len(zs) != len(targets):
        raise ValueError(f"{len(zs)} projector outputs but {len(targets)} teacher feature tensors")
    if not zs:
        raise ValueError("repa_loss needs at least one teacher")
    losses: list[Tensor] = []
    cosines: list[Tensor] = []
    for i, (z, y) in enumerate(zip(zs, targets)):
        if z.shape != y.shape:
            raise ValueError(
                f"teacher {i}: projector output {tuple(z.shape)} (B, T, D) does not match teacher "
                f"features {tuple(y.shape)}: z tokens {z.shape[1] if z.ndim > 1 else '?'} vs teacher "
                f"tokens {y.shape[1] if y.ndim > 1 else '?'} (resample explicitly with resample_tokens)")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_n = F.normalize(z.float(), dim=-1)  # (B, T, D)
            y_n = F.normalize(y.detach().float(), dim=-1)  # (B, T, D)
            cos = (z_n * y_n).sum(dim=-1)  # (B, T)
            mean_cos = cos.mean()
        losses.append(-mean_cos)
        cosines.append(mean_cos.detach())
    return torch.stack(losses).mean(), cosines


def resample_tokens(feats: Tensor, grid: int) -> Tensor:
    """Resample a square teacher token grid (B, T, D) to the student grid (B, grid*grid, D).

    The explicit alternative to refusing a token-count mismatch (e.g. DINOv2 at 224 px gives
    16x16 tokens and a SiT/4 at 256 px has 8x8). Bilinear on the 2-D grid with
    ``align_corners=False``, antialiased when downsampling. Tokens are row-major. The result has
    the input dtype; the arithmetic is in fp32.
    """
    B, T, D = feats.shape
    side = math.isqrt(T)
    if side * side != T:
        raise ValueError(f"cannot resample {T} teacher tokens: not a square grid")
    if side == grid:
        return feats
    fmap = feats.float().transpose(1, 2).reshape(B, D, side, side)  # (B, D, s, s)
    fmap = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False,
                         antialias=grid < side)  # (B, D, g, g)
    return fmap.flatten(2).transpose(1, 2).to(feats.dtype)  # (B, g*g, D)

