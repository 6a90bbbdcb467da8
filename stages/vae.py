"""The SD-VAE encoder of stage one (diffusers ``AutoencoderKL``).

Latents are stored as the posterior (mean and std of the diagonal Gaussian), not as a sample, so
that training can draw a fresh ``mean + std * eps`` at every step. Scaling is left to the trainer,
which reads ``scaling_factor`` / ``shift_factor`` from the cache metadata.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.utils import is_accelerate_available

from cache.errors import UsageError
from stages.hashing import state_dict_sha256

__all__ = [
    "DEFAULT_VAE",
    "TINY_VAE",
    "VAESpec",
    "encode_images",
    "load_vae",
    "state_dict_sha256",
    "vae_metadata",
]

logger = logging.getLogger(__name__)

#: The VAE used by REPA (and DiT / SiT) on ImageNet.
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
#: Name of a small random-initialised VAE with the real geometry, for tests and demos.
TINY_VAE = "tiny"


@dataclass(frozen=True)
class VAESpec:
    """Which VAE to load.

    Attributes:
        name: A Hugging Face model id, a local diffusers folder, or ``"tiny"``.
        revision: Hub revision (branch, tag or commit) for a model id; ignored otherwise.
    """

    name: str = DEFAULT_VAE
    revision: str | None = None


def _build_tiny_vae() -> AutoencoderKL:
    """Build the tiny VAE with identical weights in every process (seeded, global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=256,
        )


def _looks_like_path(name: str) -> bool:
    """True for names that can only be a local path (a hub id is ``name`` or ``owner/name``)."""
    return (
        os.path.isabs(name)
        or name.startswith(("./", "../", "~", ".\\", "..\\"))
        or name in (".", "..")
        or name.count("/") > 1
    )


def _short_reason(exc: BaseException) -> str:
    """First line of an exception's message without its final period, at most 200 characters."""
    text = str(exc).strip()
    line = text.splitlines()[0].rstrip(". ") if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def load_vae(
    spec: VAESpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load a VAE in eval mode with gradients off.

    ``"tiny"`` builds a small random-initialised ``AutoencoderKL`` (seeded, identical in every
    process) with the real geometry: 8x downsampling, 4 latent channels (``4x32x32`` at 256 px). An
    existing local folder is loaded with ``from_pretrained`` (a full pipeline folder with a ``vae/``
    sub-folder works too); any other name is a Hugging Face model id loaded at ``spec.revision``.

    Raises:
        UsageError: the VAE cannot be loaded (missing folder, unknown id, no network).
    """
    name = spec.name
    if name == TINY_VAE:
        # Plain nn.Module.to: diffusers' own .to() warns about fp32 modules on every dtype cast.
        vae = torch.nn.Module.to(_build_tiny_vae(), dtype=dtype)
    else:
        local = Path(name).expanduser()
        try:
            if local.is_dir():
                # A full pipeline folder keeps its VAE in vae/.
                is_pipeline = (
                    not (local / "config.json").exists()
                    and (local / "vae" / "config.json").exists()
                )
                subfolder = "vae" if is_pipeline else None
                vae = AutoencoderKL.from_pretrained(
                    str(local),
                    subfolder=subfolder,
                    torch_dtype=dtype,
                    low_cpu_mem_usage=is_accelerate_available(),
                )
            elif local.exists():
                raise NotADirectoryError(f"{name} is not a folder")
            elif _looks_like_path(name):
                raise FileNotFoundError(f"no such folder {name}")
            else:
                vae = AutoencoderKL.from_pretrained(
                    name,
                    revision=spec.revision,
                    torch_dtype=dtype,
                    low_cpu_mem_usage=is_accelerate_available(),
                )
        except Exception as exc:  # noqa: BLE001 - every loading failure is the user's to fix
            raise UsageError(
                f"cannot load VAE '{name}': {_short_reason(exc)}; "
                "pass a local diffusers folder with --vae"
            ) from exc
    vae = vae.to(device)
    vae.eval()
    vae.requires_grad_(False)
    logger.info("loaded VAE %s on %s (%s)", name, device, dtype)
    return vae


def vae_metadata(vae: AutoencoderKL, spec: VAESpec) -> dict[str, Any]:
    """Describe a loaded VAE for the cache metadata (JSON-friendly)."""
    config = vae.config
    return {
        "id": spec.name,
        "revision": spec.revision,
        "tiny": spec.name == TINY_VAE,
        "class": type(vae).__name__,
        "scaling_factor": float(config.scaling_factor),
        "shift_factor": (
            None if getattr(config, "shift_factor", None) is None else float(config.shift_factor)
        ),
        "latent_channels": int(config.latent_channels),
        "downsample_factor": 2 ** (len(config.block_out_channels) - 1),
        "weights_sha256": state_dict_sha256(vae),
    }


def encode_images(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode uint8 images to the VAE posterior.

    Args:
        vae: A loaded VAE.
        images: uint8 ``(B, 3, H, W)`` on any device.

    Returns:
        ``(mean, std)`` of the latent distribution, each float32 ``(B, C, H/f, W/f)`` on the VAE's
        device (``f`` the downsample factor, 8 for SD-VAE).

    Raises:
        ValueError: ``images`` is not a uint8 ``(B, 3, H, W)`` tensor.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 images of shape (B, 3, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    with torch.no_grad():
        x = images.to(device=vae.device).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        x = x.to(dtype=vae.dtype)
        dist = vae.encode(x).latent_dist
        mean = dist.mean.float()  # (B, C, H/f, W/f)
        std = dist.std.float()  # (B, C, H/f, W/f)
    return mean, std
