"""``--method reg``: Representation Entanglement for Generation (arXiv 2507.01467,
github.com/Martinser/REG).

The teacher's CLS token of the same view becomes part of what the student denoises:

* it is noised on the same path at the same time as the latent, with its own noise, and enters
  as an extra token 0 through ``Linear(Z, D)`` and a LayerNorm; its position embedding is the
  zero vector (the sin-cos table with one extra leading token, as REG builds it);
* the final layer's adaLN output of token 0 goes through a zero-initialised ``Linear(D, Z)`` that
  predicts the CLS velocity;
* the loss is ``L_v + 0.5 * REPA + 0.03 * L_v(CLS)``, and the REPA target of each teacher is
  ``[CLS; patch tokens]`` (257 tokens for DINOv2 at 256 px), aligned with all student tokens.

The CLS token that enters the student is the first ``--teacher``'s. Sampling integrates the latent
and the CLS token jointly from noise; the CLS velocity has its own guidance scale (``--cls-cfg``;
REG's evaluation uses cfg 2.3, cls-cfg 2.3 and the guidance interval up to t = 0.85).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from repa_cache.cache.errors import UsageError
from repa_cache.train.config import SamplingDefaults
from repa_cache.train.methods.base import AlignTargets, Method, MethodOptions, StepBatch
from repa_cache.train.model import SiT, SiTConfig, modulate


@dataclass
class RegOptions(MethodOptions):
    proj_coeff: float = 0.5
    cls_coeff: float = 0.03  # weight of the CLS token's denoising loss

    def validate(self) -> None:
        super().validate()
        if not self.cls_coeff >= 0 or self.cls_coeff == float("inf"):
            raise UsageError(f"reg cls_coeff must be a finite number >= 0, got {self.cls_coeff}")


class RegSiT(SiT):
    """SiT that also denoises one CLS token: ``forward(x, t, y, cls) -> (v, zs, cls_v)``."""

    OUTPUT_MODULES = (*SiT.OUTPUT_MODULES, "cls_out.")

    def __init__(self, config: SiTConfig, cls_dim: int) -> None:
        super().__init__(config)
        D = config.hidden_size
        embed = nn.Linear(cls_dim, D)
        nn.init.xavier_uniform_(embed.weight)
        nn.init.zeros_(embed.bias)
        self.cls_in = nn.Sequential(embed, nn.LayerNorm(D, eps=1e-6))
        self.cls_out = nn.Linear(D, cls_dim)
        nn.init.zeros_(self.cls_out.weight)  # a fresh model predicts a zero CLS velocity, as the latent's
        nn.init.zeros_(self.cls_out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cls: Tensor | None = None, *, align: bool = True,  # type: ignore[override]
                encoder_only: bool = False) -> tuple[Tensor | None, list[Tensor], Tensor | None]:
        """x (B, C, H, W), t (B,), y (B,), cls (B, Z) noisy CLS token at time t."""
        if cls is None:
            raise ValueError("the REG student needs the noisy CLS token")
        c = self.condition(t, y)  # (B, D)
        tok = self.cls_in(cls).unsqueeze(1)  # (B, 1, D); its position embedding is zero
        h = torch.cat([tok, self.embed(x)], dim=1)  # (B, 1 + T, D)
        h, zs = self.run_blocks(h, c, align, encoder_only)  # zs: (B, 1 + T, Z) each
        if encoder_only:
            return None, zs, None
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        hn = modulate(self.final_layer.norm_final(h), shift, scale)  # (B, 1 + T, D)
        v = self.unpatchify(self.final_layer.linear(hn[:, 1:]))  # (B, C, H, W)
        return v, zs, self.cls_out(hn[:, 0])  # cls velocity (B, Z)


class Reg(Method[RegOptions]):
    name = "reg"
    summary = "REG: the first teacher's CLS token denoised as token 0, aligned to [CLS; patches] (0.5 REPA + 0.03 CLS)"
    source = "arXiv 2507.01467; github.com/Martinser/REG (loss.py, models/sit.py, samplers.py)"
    Options = RegOptions
    extra_terms = ("denoise_cls",)
    sampling = SamplingDefaults(sampler="sde", steps=250, cfg_scale=2.3, guidance_interval=(0.0, 0.85), cls_cfg_scale=2.3)
    sampling_source = "REG's eval.sh (generate.py --mode sde --num-steps 250 --cfg-scale 2.3 --cls-cfg-scale 2.3 --guidance-high 0.85)"

    def teacher_fields(self, align: bool = True) -> tuple[str, ...]:
        return ("cls", "patch") if align else ("cls",)

    def check_cache(self, arrays: dict[str, Sequence[str]]) -> None:
        first = next(iter(arrays), None)
        if first is not None and "cls" not in arrays[first]:
            raise UsageError(f"--method reg needs the CLS token of teacher '{first}', which the cache does not hold")
        super().check_cache(arrays)

    def build_student(self, config: SiTConfig) -> SiT:
        return RegSiT(config, cls_dim=config.z_dims[0])

    def student_tokens(self, config: SiTConfig) -> int:
        return config.num_tokens + 1

    def targets(self, batch: StepBatch) -> AlignTargets:
        return AlignTargets([torch.cat([c.unsqueeze(1), p], dim=1) for c, p in zip(batch.cls, batch.patch)])  # (B, 1 + T, Z)

    def extras(self, batch: StepBatch) -> list[Tensor]:
        return [batch.cls[0]]  # (B, Z)

    def extra_shapes(self, config: SiTConfig) -> list[tuple[int, ...]]:
        return [(config.z_dims[0],)]

    def extra_weights(self) -> list[float]:
        return [self.options.cls_coeff]
