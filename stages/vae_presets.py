"""Named VAEs for ``--vae``: where each one's weights live, its geometry and who publishes it.

Torch-free, so the command line can check a name (and suggest one) before anything heavy is
imported. :mod:`repa_cache.stages.vae` does the loading.

A preset is one of three kinds of source:

* a Hugging Face model id holding a diffusers ``AutoencoderKL`` (``subfolder`` when it is a
  pipeline's ``vae/``);
* one original single-file checkpoint in a Hugging Face repository (``file``), in the layout of
  latent diffusion's ``AutoencoderKL``, read with the diffusers config named by ``config``;
* the random-initialised ``tiny`` presets (built in :mod:`repa_cache.stages.vae`).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any

from repa_cache.cache.errors import UsageError

__all__ = [
    "BUNDLED_CONFIGS",
    "SINGLE_FILE_SUFFIXES",
    "TINY_VAES",
    "VAE_PRESETS",
    "VAEPreset",
    "canonical_vae",
    "check_vae_name",
    "suggest_vae",
]

#: File endings of single-file checkpoints (``--vae FILE --vae-config CONFIG``).
SINGLE_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")
#: The random-initialised presets for tests and demos, by name: (down blocks, latent channels).
#: ``tiny`` has SD-VAE's geometry (f8, 4 channels), ``tiny-f16`` that of today's f16 latent spaces
#: (16x downsampling, 32 channels: REPA-E's E2E-VAVAE, VA-VAE).
TINY_VAES: dict[str, tuple[int, int]] = {"tiny": (4, 4), "tiny-f16": (5, 32)}


@dataclass(frozen=True)
class VAEPreset:
    """Where a named VAE comes from.

    Attributes:
        source: Hugging Face repository id.
        geometry: Downsampling and latent channels, for people (``f8, 4 channels``).
        origin: Who publishes it and which recipes use it.
        subfolder: The VAE's folder inside a pipeline repository.
        file: An original single-file checkpoint inside ``source``.
        config: The diffusers config a single file is read with (a name in
            :data:`BUNDLED_CONFIGS`).
    """

    source: str
    geometry: str
    origin: str
    subfolder: str | None = None
    file: str | None = None
    config: str | None = None

    @property
    def plain(self) -> bool:
        """True when ``source`` alone names the VAE (a diffusers model id)."""
        return self.subfolder is None and self.file is None


VAE_PRESETS: dict[str, VAEPreset] = {
    "sd-vae-ft-ema": VAEPreset("stabilityai/sd-vae-ft-ema", "f8, 4 channels", "Stability AI; REPA, SiT and DiT on ImageNet"),
    "sd-vae-ft-mse": VAEPreset("stabilityai/sd-vae-ft-mse", "f8, 4 channels", "Stability AI; MSE-tuned decoder"),
    "e2e-sdvae": VAEPreset("REPA-E/e2e-sdvae-hf", "f8, 4 channels", "REPA-E: SD-VAE tuned end to end"),
    "e2e-invae": VAEPreset("REPA-E/e2e-invae-hf", "f16, 32 channels", "REPA-E: IN-VAE tuned end to end"),
    "e2e-vavae": VAEPreset("REPA-E/e2e-vavae-hf", "f16, 32 channels", "REPA-E: VA-VAE tuned end to end (the frozen-VAE record)"),
    "va-vae": VAEPreset("hustvl/vavae-imagenet256-f16d32-dinov2", "f16, 32 channels", "LightningDiT's VA-VAE (DINOv2-aligned)",
                        file="vavae-imagenet256-f16d32-dinov2.pt", config="va-vae-f16d32"),
    "flux": VAEPreset("black-forest-labs/FLUX.1-dev", "f8, 16 channels", "FLUX.1 (gated repository: accept its licence first)",
                      subfolder="vae"),
    "sd3.5": VAEPreset("stabilityai/stable-diffusion-3.5-large", "f8, 16 channels", "Stable Diffusion 3.5 (gated repository)",
                       subfolder="vae"),
}

#: Diffusers ``AutoencoderKL`` configs for single files whose publishers ship no diffusers config.
#: ``va-vae-f16d32`` is latent diffusion's kl-f16 layout with 32 channels: ``ch 128``, ``ch_mult
#: (1, 1, 2, 2, 4)``, two resnets per level and attention at the 16x16 level (the last encoder
#: level, the first decoder level). Its scale is 1: LightningDiT normalises with the dataset's
#: own statistics (``--latent-norm dataset``).
BUNDLED_CONFIGS: dict[str, dict[str, Any]] = {
    "va-vae-f16d32": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 128, 256, 256, 512],
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 32,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 1.0,
    },
}


def canonical_vae(name: str) -> str:
    """The name a cache records for ``name``: a preset that is just a model id becomes that id
    (so ``sd-vae-ft-ema`` and ``stabilityai/sd-vae-ft-ema`` make the same cache); anything else
    is kept as given."""
    preset = VAE_PRESETS.get(name)
    return preset.source if preset is not None and preset.plain else name


def suggest_vae(name: str) -> str:
    """``"; did you mean 'X'?"`` when ``name`` is close to a preset name, else ``""``."""
    close = difflib.get_close_matches(name, [*VAE_PRESETS, *TINY_VAES, *BUNDLED_CONFIGS], n=1, cutoff=0.75)
    return f"; did you mean '{close[0]}'?" if close else ""


def _named(name: str, known: list[str]) -> bool:
    """True for a known name, an existing local path, or what can only be a model id or a path
    (it has a ``/``); a bare word that is none of these is a typo."""
    return name in known or "/" in name or os.sep in name or os.path.exists(os.path.expanduser(name))


def check_vae_name(vae: str | None, config: str | None) -> None:
    """Refuse a ``--vae`` or ``--vae-config`` that names nothing, before any model is touched.

    Raises:
        UsageError: a bare name that is no preset, tiny model, bundled config or local path.
    """
    if vae is not None and not _named(vae, [*VAE_PRESETS, *TINY_VAES]):
        raise UsageError(f"unknown VAE '{vae}' (presets: {', '.join(VAE_PRESETS)}, {', '.join(TINY_VAES)}; or an HF id "
                         f"owner/name, a local folder, a single file){suggest_vae(vae)}")
    if config is not None and not _named(config, [*BUNDLED_CONFIGS, *VAE_PRESETS, *TINY_VAES]):
        raise UsageError(f"unknown --vae-config '{config}' (bundled: {', '.join(BUNDLED_CONFIGS)}; or a preset, an HF id "
                         f"owner/name, a local diffusers folder){suggest_vae(config)}")
