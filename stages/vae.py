"""The SD-VAE encoder of stage one (diffusers ``AutoencoderKL``).

Latents are stored as the posterior (mean and std of the diagonal Gaussian), not as a sample, so
that training can draw a fresh ``mean + std * eps`` at every step. Normalisation is left to the
trainer: :func:`latent_norm` reads it from the VAE's own config, stage one records it in the cache
(:class:`~repa_cache.cache.format.LatentNorm`), and the trainer and samplers apply it from there.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.utils import is_accelerate_available

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import LatentNorm

__all__ = [
    "DEFAULT_VAE",
    "TINY_F16_VAE",
    "TINY_VAE",
    "VAESpec",
    "encode_images",
    "latent_norm",
    "load_vae",
    "vae_config",
]

logger = logging.getLogger(__name__)

#: The VAE used by REPA (and DiT / SiT) on ImageNet.
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
#: Name of a small random-initialised VAE with the real geometry, for tests and demos.
TINY_VAE = "tiny"
#: A small random-initialised VAE with the geometry of today's f16 latent spaces (16x downsampling,
#: 32 channels: REPA-E's E2E-VAVAE, VA-VAE), for tests and demos.
TINY_F16_VAE = "tiny-f16"
#: The random-initialised presets, by name: (down blocks, latent channels).
TINY_VAES: dict[str, tuple[int, int]] = {TINY_VAE: (4, 4), TINY_F16_VAE: (5, 32)}


@dataclass(frozen=True)
class VAESpec:
    """Which VAE to load.

    Attributes:
        name: A Hugging Face model id, a local diffusers folder, or ``"tiny"``.
        revision: Hub revision (branch, tag or commit) for a model id; ignored otherwise.
    """

    name: str = DEFAULT_VAE
    revision: str | None = None


def _build_tiny_vae(name: str = TINY_VAE) -> AutoencoderKL:
    """Build a tiny VAE preset with identical weights in every process (seeded, global RNG
    untouched): ``tiny`` is f8 with 4 channels (SD-VAE's geometry), ``tiny-f16`` f16 with 32."""
    blocks, channels = TINY_VAES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=(8, 16, 16, 16, 16)[:blocks],
            layers_per_block=1,
            latent_channels=channels,
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


def _where(spec: VAESpec) -> tuple[str, dict[str, Any]]:
    """The name to hand to diffusers and its keyword arguments (``subfolder`` or ``revision``).

    An existing local folder is used as it is, or its ``vae/`` sub-folder when it is a full
    pipeline folder; any other name that is not a path is a Hugging Face model id.

    Raises:
        NotADirectoryError, FileNotFoundError: a local path that is not a folder.
    """
    name = spec.name
    local = Path(name).expanduser()
    if local.is_dir():
        is_pipeline = not (local / "config.json").exists() and (local / "vae" / "config.json").exists()
        return str(local), {"subfolder": "vae" if is_pipeline else None}
    if local.exists():
        raise NotADirectoryError(f"{name} is not a folder")
    if _looks_like_path(name):
        raise FileNotFoundError(f"no such folder {name}")
    return name, {"revision": spec.revision}


def _cannot_load(spec: VAESpec, exc: BaseException) -> UsageError:
    return UsageError(f"cannot load VAE '{spec.name}': {_short_reason(exc)}; pass a local diffusers folder with --vae")


def load_vae(
    spec: VAESpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load a VAE in eval mode with gradients off.

    ``"tiny"`` builds a small random-initialised ``AutoencoderKL`` (seeded, identical in every
    process) with the real geometry: 8x downsampling, 4 latent channels (``4x32x32`` at 256 px);
    ``"tiny-f16"`` one with 16x downsampling and 32 channels (``32x16x16`` at 256 px). An
    existing local folder is loaded with ``from_pretrained`` (a full pipeline folder with a ``vae/``
    sub-folder works too); any other name is a Hugging Face model id loaded at ``spec.revision``.

    Raises:
        UsageError: the VAE cannot be loaded (missing folder, unknown id, no network).
    """
    if spec.name in TINY_VAES:
        # Plain nn.Module.to: diffusers' own .to() warns about fp32 modules on every dtype cast.
        vae = torch.nn.Module.to(_build_tiny_vae(spec.name), dtype=dtype)
    else:
        try:
            where, kwargs = _where(spec)
            vae = AutoencoderKL.from_pretrained(where, **kwargs, torch_dtype=dtype, low_cpu_mem_usage=is_accelerate_available())
        except Exception as exc:
            raise _cannot_load(spec, exc) from exc
    vae = vae.to(device)
    vae.eval()
    vae.requires_grad_(False)
    logger.info("loaded VAE %s on %s (%s)", spec.name, device, dtype)
    return vae


def vae_config(spec: VAESpec) -> dict[str, Any]:
    """The VAE's config (geometry, ``scaling_factor``, ...) without loading its weights; found
    where :func:`load_vae` would find them.

    Raises:
        UsageError: the config cannot be read (missing folder, unknown id, no network).
    """
    if spec.name in TINY_VAES:
        return dict(_build_tiny_vae(spec.name).config)
    try:
        where, kwargs = _where(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hub deprecation chatter; a failure is reported below
            return dict(AutoencoderKL.load_config(where, **kwargs))
    except Exception as exc:
        raise _cannot_load(spec, exc) from exc


def _default_scaling_factor() -> float:
    """``AutoencoderKL``'s own default ``scaling_factor`` (SD-VAE's), read from its signature."""
    return float(inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default)


def latent_norm(config: Mapping[str, Any]) -> LatentNorm:
    """The latent normalisation a VAE's config asks for: ``z = (x - shift) * scale``.

    ``scaling_factor`` (``AutoencoderKL``'s default where the config has none) and ``shift_factor``
    give one scalar each (SD-VAE: scale 0.18215, shift 0). A config with per-channel
    ``latents_mean`` / ``latents_std`` means ``z = (x - mean) / std * scaling_factor``: shift =
    mean and scale = scaling_factor / std, per channel.

    Raises:
        UsageError: the config has both per-channel statistics and a ``shift_factor``, or
            per-channel statistics of different lengths or a ``latents_std`` that is not positive.
    """
    factor = config.get("scaling_factor")
    factor = _default_scaling_factor() if factor is None else float(factor)
    shift = config.get("shift_factor")
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None or std is None:
        return LatentNorm((factor,), (0.0 if shift is None else float(shift),))
    if shift:
        raise UsageError("the VAE config has both per-channel latents_mean/latents_std and a shift_factor; which one applies is unclear")
    if len(mean) != len(std):
        raise UsageError(f"the VAE config has {len(mean)} latents_mean values but {len(std)} latents_std values")
    if not all(float(s) > 0 for s in std):
        raise UsageError(f"the VAE config's latents_std must be positive, not {list(std)}")
    return LatentNorm(tuple(factor / float(s) for s in std), tuple(float(m) for m in mean))


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
