"""``--method irepa``: iREPA (arXiv 2512.10794, github.com/End2End-Diffusion/iREPA).

Two changes to REPA, both about keeping the teacher's *spatial* structure:

* the projector is one convolution over the student's token grid (kernel 3, same padding) from the
  hidden width to the teacher's dimension, instead of a per-token MLP; its weights start as a
  xavier-uniform (Z, D*k*k) linear with a zero bias (``init=xavier``), or as torch's default
  convolution initialisation (``init=torch``);
* the target is normalised over the tokens of each image, per channel:
  ``y' = (y - alpha * mean_T(y)) / (std_T(y) + eps)`` with alpha = 0.6, which removes most of the
  component shared by all tokens of an image (the "global" part) and rescales each channel.

The projection coefficient is 1.0. ``std_T`` is the unbiased standard deviation over the T tokens
(torch's default), eps = 1e-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from repa_cache.cache.errors import UsageError
from repa_cache.train.methods.base import AlignTargets, Method, MethodOptions, StepBatch
from repa_cache.train.model import SiT, SiTConfig
from repa_cache.train.usit import build_student_model

#: How the conv projector's weights start: xavier-uniform as a (Z, D*k*k) linear with a zero bias
#: (as every linear of the SiT), or what nn.Conv2d draws itself (iREPA's latent-diffusion code).
PROJECTOR_INITS: tuple[str, ...] = ("xavier", "torch")


@dataclass
class IRepaOptions(MethodOptions):
    proj_coeff: float = 1.0
    alpha: float = 0.6  # share of the per-image token mean removed from the target
    eps: float = 1e-6  # added to the per-image, per-channel token std
    kernel_size: int = 3  # side of the projector's convolution (odd: same padding)
    init: str = "xavier"  # projector weights: "xavier" (uniform, zero bias) or "torch" (nn.Conv2d's own)

    def validate(self) -> None:
        super().validate()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise UsageError(f"irepa kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.init not in PROJECTOR_INITS:
            raise UsageError(f"irepa init must be one of {', '.join(PROJECTOR_INITS)}, got '{self.init}'")
        if not self.eps > 0:
            raise UsageError(f"irepa eps must be positive, got {self.eps}")


def spatial_zscore(feats: Tensor, alpha: float, eps: float) -> Tensor:
    """``(y - alpha * mean_T(y)) / (std_T(y) + eps)`` over the tokens of each sample, per channel.

    feats (B, T, Z) -> (B, T, Z) in fp32 (the std of fp16 tokens with large channels overflows)."""
    y = feats.float()
    return (y - alpha * y.mean(dim=1, keepdim=True)) / (y.std(dim=1, keepdim=True) + eps)


class ConvProjector(nn.Module):
    """A ``k x k`` convolution over the square token grid: (B, T, D) -> (B, T, Z)."""

    def __init__(self, hidden_size: int, z_dim: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(hidden_size, z_dim, kernel_size, padding=kernel_size // 2)

    def forward(self, h: Tensor) -> Tensor:
        B, T, D = h.shape
        g = math.isqrt(T)
        fmap = h.transpose(1, 2).reshape(B, D, g, g)  # (B, D, g, g), tokens row-major
        return self.conv(fmap).flatten(2).transpose(1, 2)  # (B, T, Z)


class IRepa(Method[IRepaOptions]):
    name = "irepa"
    summary = "iREPA: 3x3 conv projector, target z-scored over each image's tokens (alpha 0.6, proj_coeff 1.0)"
    source = "arXiv 2512.10794; github.com/End2End-Diffusion/iREPA (ldm/utils.py spatial_zscore, ldm/models/sit.py)"
    Options = IRepaOptions
    sampling_source = "REPA's, inherited: iREPA's README runs generate.py with its defaults and publishes no settings of its own"

    def build_student(self, config: SiTConfig) -> SiT:
        k = self.options.kernel_size
        projectors = nn.ModuleList(ConvProjector(config.hidden_size, z, k) for z in config.z_dims)
        model = build_student_model(config, projectors=projectors)
        if self.options.init == "torch":
            return model  # the convolutions keep the weights nn.Conv2d drew
        for p in projectors:
            assert isinstance(p, ConvProjector)
            nn.init.xavier_uniform_(p.conv.weight.view(p.conv.weight.shape[0], -1))  # as a (Z, D*k*k) linear
            assert p.conv.bias is not None
            nn.init.zeros_(p.conv.bias)
        return model

    def targets(self, batch: StepBatch) -> AlignTargets:
        o = self.options
        return AlignTargets([spatial_zscore(y, o.alpha, o.eps) for y in batch.patch])
