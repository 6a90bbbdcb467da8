"""Write a diffusers ``AutoencoderKL`` in latent diffusion's original single-file layout, as
REPA-E and LightningDiT publish their VAEs, so the single-file loader can be tested offline."""

from __future__ import annotations

import re

import torch
from diffusers import AutoencoderKL

_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_TOP = {"conv_norm_out": "norm_out"}


def _attention(rest: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    layer, _, leaf = rest.rpartition(".")
    name = _ATTENTION[layer]
    if leaf == "weight" and name != "norm":
        value = value[:, :, None, None]  # latent diffusion's attention uses 1x1 convolutions
    return f"{name}.{leaf}", value


def ldm_state_dict(vae: AutoencoderKL, prefix: str = "") -> dict[str, torch.Tensor]:
    """``vae``'s weights under latent diffusion's names (``encoder.down.0.block.0.conv1.weight``),
    each key prefixed with ``prefix`` (``first_stage_model.`` for a full latent diffusion model)."""
    num_up = len(vae.config.up_block_types)
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        value = value.clone()
        if m := re.match(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$", key):
            part, kind, block, sub, index, rest = m.groups()
            level = int(block) if kind == "down" else num_up - 1 - int(block)
            if sub == "resnets":
                layer, _, leaf = rest.rpartition(".")
                name = f"{part}.{kind}.{level}.block.{index}.{_RESNET.get(layer, layer)}.{leaf}"
            elif sub == "attentions":
                rest, value = _attention(rest, value)
                name = f"{part}.{kind}.{level}.attn.{index}.{rest}"
            else:
                name = f"{part}.{kind}.{level}.{'downsample' if kind == 'down' else 'upsample'}.{rest}"
        elif m := re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key):
            part, sub, index, rest = m.groups()
            if sub == "resnets":
                name = f"{part}.mid.block_{int(index) + 1}.{rest}"
            else:
                rest, value = _attention(rest, value)
                name = f"{part}.mid.attn_1.{rest}"
        else:
            part, _, rest = key.partition(".")
            layer, _, leaf = rest.rpartition(".")
            name = key if part in ("quant_conv", "post_quant_conv") else f"{part}.{_TOP.get(layer, layer)}.{leaf}"
        out[prefix + name] = value
    return out
