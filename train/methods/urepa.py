"""``--method urepa``: U-REPA (Tian et al., arXiv 2503.18414, NeurIPS 2025).

REPA for a U-shaped student (:class:`~repa_cache.train.usit.USiT`, ``--model USiT-*``):

* the aligned tokens are the middle (lowest-resolution) stage's output; they go through REPA's MLP
  projector first and are upsampled to the teacher's token grid afterwards (the student does
  that in its forward pass, so ``zs`` already has the teacher's T tokens);
* next to REPA's per-token cosine loss, a *manifold loss* aligns the relative similarity between
  the samples of the batch: at each token position, the (B, B) matrix of cosine similarities
  between the student's projected tokens of all samples against the same matrix of the teacher's
  tokens, penalised by the mean squared difference.

Objective: ``denoise + proj_coeff * (align + manifold_weight * manifold)``, proj_coeff 0.5,
manifold_weight 3.0 (the paper's w). Choices where the paper is silent are listed in
docs/methods.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from repa_cache.cache.errors import UsageError
from repa_cache.train.loss import repa_loss
from repa_cache.train.methods.base import AlignContext, AlignTargets, Method, MethodOptions
from repa_cache.train.model import SiTConfig


@dataclass
class URepaOptions(MethodOptions):
    proj_coeff: float = 0.5
    manifold_weight: float = 3.0  # w: weight of the manifold loss inside the alignment term

    def validate(self) -> None:
        super().validate()
        if not (self.manifold_weight >= 0 and math.isfinite(self.manifold_weight)):
            raise UsageError(f"urepa manifold_weight must be a finite number >= 0, got {self.manifold_weight}")


def manifold_loss(z: Tensor, y: Tensor) -> Tensor:
    """Mean squared difference between the sample-to-sample cosine similarities of the student's
    projected tokens and of the teacher's, per token position.

    ``S_z[t, i, j] = cos(z[i, t], z[j, t])``, ``S_y`` the same of y, loss ``mean_{t,i,j}
    (S_z - S_y)^2`` over all B*B pairs (the diagonal is 1 on both sides and adds 0). In fp32 with
    autocast off; the target is detached.

    z, y: (B, T, Z) -> scalar."""
    if z.shape != y.shape:
        raise ValueError(f"projector output {tuple(z.shape)} (B, T, Z) does not match teacher tokens {tuple(y.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        zn = F.normalize(z.float(), dim=-1)  # (B, T, Z)
        yn = F.normalize(y.detach().float(), dim=-1)  # (B, T, Z)
        sim_z = torch.einsum("itz,jtz->tij", zn, zn)  # (T, B, B)
        sim_y = torch.einsum("itz,jtz->tij", yn, yn)  # (T, B, B)
        return (sim_z - sim_y).square().mean()


class URepa(Method[URepaOptions]):
    name = "urepa"
    summary = ("U-REPA: U-shaped student (USiT-*), middle stage aligned after projection and upsampling, "
               "plus a sample-similarity manifold loss (proj_coeff 0.5, manifold_weight 3.0)")
    source = "arXiv 2503.18414 (U-REPA: Aligning Diffusion U-Nets to ViTs)"
    Options = URepaOptions
    sampling_source = "REPA's, inherited: no public U-REPA sampling settings could be read"

    def check_student(self, config: SiTConfig) -> None:
        if config.layout != "u":
            raise UsageError("--method urepa needs a U-shaped model (USiT-B/2, USiT-L/2, USiT-XL/2, USiT-tiny/2)")

    def alignment(self, zs: Sequence[Tensor], targets: AlignTargets,
                  ctx: AlignContext) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
        """REPA's cosine loss plus ``manifold_weight`` times the manifold loss (mean over teachers);
        the manifold part is logged on its own as ``manifold``."""
        align, cos = repa_loss(zs, targets.tokens)
        manifold = torch.stack([manifold_loss(z, y) for z, y in zip(zs, targets.tokens)]).mean()
        w = self.options.manifold_weight
        return align + w * manifold, cos, {"manifold": manifold}
