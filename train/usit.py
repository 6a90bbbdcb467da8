"""USiT: a U-shaped SiT, the student of U-REPA (arXiv 2503.18414).

U-REPA aligns a diffusion U-Net rather than an isotropic transformer: its middle (lowest
resolution) stage is aligned, because the long skip connections let the outer stages carry the
high-frequency detail and leave the middle stage free to hold semantics. USiT builds such a U-Net
from SiT's own parts (patch embedder, adaLN-Zero blocks, final layer), so that it trains, samples
and checkpoints exactly like a SiT. With ``e = depth - encoder_depth`` and ``g`` tokens per side:

* stage 1, blocks ``1..e`` on the full ``g x g`` grid; each block's output is kept for a skip;
* a 2x2 token merge (the four tokens of each 2x2 cell concatenated, ``Linear(4D, D)``);
* stage 2 (the middle), blocks ``e+1..encoder_depth`` on the ``g/2 x g/2`` grid; its output goes
  through the projectors and is then upsampled bilinearly to the full grid (the teacher's grid);
* a 2x2 token split (``Linear(D, 4D)``, each token back into its 2x2 cell);
* stage 3, blocks ``encoder_depth+1..depth`` on the full grid; before each, the hidden tokens and
  the output of the mirrored stage-1 block (last in, first out, as in U-ViT) are concatenated and
  mapped back to the width by ``Linear(2D, D)``;
* SiT's final layer.

Every stage has the width D, so a USiT has SiT's parameters plus the merge, the split and the
skip linears. Shapes in comments: B batch, T = g*g tokens, D width, Z teacher dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repa_cache.train.model import SiT, SiTConfig


def _init_linear(linear: nn.Linear) -> None:
    """DiT's init for a linear (xavier weight, zero bias), as SiT gives all of its own."""
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class TokenMerge(nn.Module):
    """2x2 cells of a ``g x g`` token grid into one token each: (B, g*g, D) -> (B, g*g/4, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(4 * dim, dim)

    def forward(self, h: Tensor, grid: int) -> Tensor:
        B, _, D = h.shape
        half = grid // 2
        cells = h.reshape(B, half, 2, half, 2, D)  # (B, g/2, 2, g/2, 2, D), tokens row-major
        cells = cells.permute(0, 1, 3, 2, 4, 5)  # (B, g/2, g/2, 2, 2, D)
        return self.linear(cells.reshape(B, half * half, 4 * D))  # (B, T/4, D)


class TokenSplit(nn.Module):
    """Each token into a 2x2 cell, the inverse layout of :class:`TokenMerge`: (B, T/4, D) -> (B, T, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 4 * dim)

    def forward(self, h: Tensor, grid: int) -> Tensor:
        B, _, D = h.shape
        half = grid // 2
        cells = self.linear(h).reshape(B, half, half, 2, 2, D)  # (B, g/2, g/2, 2, 2, D)
        cells = cells.permute(0, 1, 3, 2, 4, 5)  # (B, g/2, 2, g/2, 2, D)
        return cells.reshape(B, grid * grid, D)  # (B, T, D)


def upsample_tokens(z: Tensor, grid: int) -> Tensor:
    """Bilinear upsampling of square-grid tokens to ``grid x grid``: (B, t, Z) -> (B, grid*grid, Z).

    ``align_corners=False`` (pixel centres), so each 2x upsampled token mixes its own cell's value
    (weight 3/4 per axis) with its nearest neighbour's (1/4); edges repeat the border value."""
    B, t, Z = z.shape
    side = round(t**0.5)
    fmap = z.transpose(1, 2).reshape(B, Z, side, side)  # (B, Z, g/2, g/2)
    up = F.interpolate(fmap, size=(grid, grid), mode="bilinear", align_corners=False)  # (B, Z, g, g)
    return up.flatten(2).transpose(1, 2)  # (B, g*g, Z)


class USiT(SiT):
    """A U-shaped SiT (see the module docstring) with SiT's interface: ``forward(x, t, y, *,
    align, encoder_only)``, projectors, ``blocks`` (stage 1, middle, stage 3 in order), the warm-up
    and backbone parameter sets. The projected tokens (B, T, Z) come from the middle stage."""

    #: the split and the skip linears run after the middle stage: the encoder warm-up does not train them
    OUTPUT_MODULES: tuple[str, ...] = ("split.", "skips.", "final_layer.")
    LAYOUTS: tuple[str, ...] = ("u",)

    def __init__(self, config: SiTConfig, projectors: nn.ModuleList | None = None) -> None:
        super().__init__(config, projectors)
        D = config.hidden_size
        self.outer = config.depth - config.encoder_depth  # blocks per full-grid stage
        self.merge = TokenMerge(D)
        self.split = TokenSplit(D)
        self.skips = nn.ModuleList(nn.Linear(2 * D, D) for _ in range(self.outer))
        for linear in (self.merge.linear, self.split.linear, *self.skips):
            assert isinstance(linear, nn.Linear)
            _init_linear(linear)

    def run_blocks(self, h: Tensor, c: Tensor, align: bool = True,
                   encoder_only: bool = False) -> tuple[Tensor, list[Tensor]]:
        """Tokens (B, T, D) through the three stages: ``(h, zs)`` with zs the projected middle-stage
        tokens upsampled to the full grid, each (B, T, Z) (empty when ``align`` is False). With
        ``encoder_only`` stage 3 does not run and h is the middle stage's output (B, T/4, D)."""
        g, enc = self.config.grid, self.config.encoder_depth
        saved: list[Tensor] = []
        for block in self.blocks[:self.outer]:
            h = block(h, c)  # (B, T, D)
            saved.append(h)
        h = self.merge(h, g)  # (B, T/4, D)
        for block in self.blocks[self.outer:enc]:
            h = block(h, c)  # (B, T/4, D)
        zs = [upsample_tokens(projector(h), g) for projector in self.projectors] if align else []  # (B, T, Z) each
        if encoder_only:
            return h, zs
        h = self.split(h, g)  # (B, T, D)
        for block, skip in zip(self.blocks[enc:], self.skips):
            h = skip(torch.cat([h, saved.pop()], dim=-1))  # (B, T, 2D) -> (B, T, D)
            h = block(h, c)  # (B, T, D)
        return h, zs


def build_student_model(config: SiTConfig, projectors: nn.ModuleList | None = None) -> SiT:
    """The student of ``config``'s layout: a SiT, or a USiT for layout ``"u"``."""
    return USiT(config, projectors) if config.layout == "u" else SiT(config, projectors)
