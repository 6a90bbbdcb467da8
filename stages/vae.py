"""The VAE encoder of stage one (diffusers ``AutoencoderKL``, any geometry: f8 or f16, 4 to 32
channels).

Latents are stored as the posterior (mean and std of the diagonal Gaussian), not as a sample, so
that training can draw a fresh ``mean + std * eps`` at every step. Normalisation is left to the
trainer: :func:`latent_norm` reads it from the VAE's own config, stage one records it in the cache
(:class:`~repa_cache.cache.format.LatentNorm`), and the trainer and samplers apply it from there.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
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
from repa_cache.stages.vae_presets import BUNDLED_CONFIGS, SINGLE_FILE_SUFFIXES, TINY_VAES, VAE_PRESETS, suggest_vae
from repa_cache.stages.weights import load_weights_file

__all__ = [
    "DEFAULT_VAE",
    "TINY_F16_VAE",
    "TINY_VAE",
    "VAESpec",
    "check_vae_file",
    "encode_images",
    "latent_norm",
    "load_vae",
    "read_single_file",
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


@dataclass(frozen=True)
class VAESpec:
    """Which VAE to load.

    Attributes:
        name: A Hugging Face model id, a local diffusers folder, a preset
            (:data:`~repa_cache.stages.vae_presets.VAE_PRESETS`), a local single-file checkpoint
            (``.safetensors`` / ``.pt`` / ``.ckpt``, latent diffusion's layout), or ``"tiny"``.
        revision: Hub revision (branch, tag or commit) for a model id; ignored otherwise.
        config: For a single file, the diffusers config it is read with: a bundled config name,
            a preset, a local diffusers folder or a model id. ``None`` for everything else.
    """

    name: str = DEFAULT_VAE
    revision: str | None = None
    config: str | None = None

    @classmethod
    def of_record(cls, model: Mapping[str, Any]) -> VAESpec:
        """The VAE a latents group (or a model card) records."""
        return cls(str(model["id"]), model.get("revision"), model.get("config"))


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
    pipeline folder; a preset gives its repository (and sub-folder); any other name that is not a
    path is a Hugging Face model id.

    Raises:
        NotADirectoryError, FileNotFoundError: a local path that is not a folder.
    """
    name = spec.name
    local = Path(name).expanduser()
    if local.is_dir():
        is_pipeline = not (local / "config.json").exists() and (local / "vae" / "config.json").exists()
        return str(local), {"subfolder": "vae" if is_pipeline else None}
    if local.exists():
        raise NotADirectoryError(f"{name} is not a folder (a single-file checkpoint ends in {', '.join(SINGLE_FILE_SUFFIXES)})")
    if _looks_like_path(name):
        raise FileNotFoundError(f"no such folder {name}")
    preset = VAE_PRESETS.get(name)
    if preset is not None:
        return preset.source, {"subfolder": preset.subfolder, "revision": spec.revision}
    return name, {"revision": spec.revision}


def _single_file(spec: VAESpec) -> tuple[Path | None, str | None]:
    """``(file, config)`` when ``spec`` names a single-file checkpoint, else ``(None, None)``.
    The file is ``None`` for a preset whose file is still on the hub."""
    preset = VAE_PRESETS.get(spec.name)
    if preset is not None and preset.file is not None:
        return None, spec.config or preset.config
    local = Path(spec.name).expanduser()
    if local.suffix.lower() in SINGLE_FILE_SUFFIXES and not local.is_dir():
        if not local.exists():
            raise FileNotFoundError(f"no such file {spec.name}")
        if spec.config is None:
            raise UsageError(f"'{spec.name}' is a single-file checkpoint: name the diffusers config it is read with "
                             f"(--vae-config: {', '.join(BUNDLED_CONFIGS)}, a preset, a local diffusers folder or an HF id)")
        return local, spec.config
    if spec.config is not None:
        raise UsageError(f"--vae-config applies to single-file checkpoints only; '{spec.name}' brings its own config")
    return None, None


def _cannot_load(spec: VAESpec, exc: BaseException) -> UsageError:
    if isinstance(exc, UsageError):
        return exc
    return UsageError(f"cannot load VAE '{spec.name}': {_short_reason(exc)}{suggest_vae(spec.name)}; "
                      "pass a local diffusers folder with --vae")


def load_vae(
    spec: VAESpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderKL:
    """Load a VAE in eval mode with gradients off.

    ``"tiny"`` builds a small random-initialised ``AutoencoderKL`` (seeded, identical in every
    process) with the real geometry: 8x downsampling, 4 latent channels (``4x32x32`` at 256 px);
    ``"tiny-f16"`` one with 16x downsampling and 32 channels (``32x16x16`` at 256 px). An
    existing local folder is loaded with ``from_pretrained`` (a full pipeline folder with a ``vae/``
    sub-folder works too); a single-file checkpoint is read with the config ``spec.config`` names
    (:func:`read_single_file`); a preset loads from its source; any other name is a Hugging Face
    model id loaded at ``spec.revision``.

    Raises:
        UsageError: the VAE cannot be loaded (missing folder, unknown id, no network), or a single
            file does not fit its config.
    """
    try:
        file, config = _single_file(spec)
        if config is not None:
            vae = torch.nn.Module.to(_load_single_file(spec, file, config), dtype=dtype)
        elif spec.name in TINY_VAES:
            # Plain nn.Module.to: diffusers' own .to() warns about fp32 modules on every dtype cast.
            vae = torch.nn.Module.to(_build_tiny_vae(spec.name), dtype=dtype)
        else:
            where, kwargs = _where(spec)
            vae = AutoencoderKL.from_pretrained(where, **kwargs, torch_dtype=dtype, low_cpu_mem_usage=is_accelerate_available())
    except Exception as exc:
        raise _cannot_load(spec, exc) from exc
    vae = vae.to(device)
    vae.eval()
    vae.requires_grad_(False)
    logger.info("loaded VAE %s on %s (%s)", spec.name, device, dtype)
    return vae


#: Keys of latent diffusion's ``AutoencoderKL`` that hold the VAE itself (a checkpoint may also
#: carry its training loss: discriminator, LPIPS, an alignment projector).
_LDM_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
#: Where a single file may nest its weights (Lightning's ``state_dict``, plain ``model``).
_NESTED_KEYS = ("state_dict", "model")
#: The attention of one level of latent diffusion's encoder or decoder (``attn_resolutions``).
_LEVEL_ATTENTION = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.(.+)$")
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def read_single_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint: ``.safetensors``, or a ``torch.save`` file read
    with ``weights_only=True`` (no pickled code runs) and memory-mapped, so its size costs no
    memory before the weights are used. A ``state_dict`` or ``model`` entry holding the weights
    is unwrapped.

    Raises:
        UsageError: the file cannot be read, or holds no tensors by name.
    """
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = load_weights_file(path)
    except Exception as exc:
        raise UsageError(f"cannot read VAE checkpoint {path}: {_short_reason(exc)}") from exc
    for key in _NESTED_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UsageError(f"VAE checkpoint {path} holds no state dict (tensors by name)")
    return dict(obj)


def _level_attentions(converted: dict[str, torch.Tensor], num_up: int) -> dict[str, torch.Tensor]:
    """Rename the attention of encoder and decoder levels, which diffusers' conversion leaves in
    latent diffusion's names (it knows only the middle block's): ``encoder.down.i.attn.j`` to
    ``encoder.down_blocks.i.attentions.j``, ``decoder.up.i.attn.j`` to
    ``decoder.up_blocks.(n-1-i).attentions.j`` (diffusers numbers the decoder from the bottom),
    1x1 convolutions to linear weights."""
    out: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        match = _LEVEL_ATTENTION.match(key)
        if match is None:
            out[key] = value
            continue
        part, level, index, rest = match.groups()
        layer, _, leaf = rest.rpartition(".")
        if part == "encoder.down":
            block = f"encoder.down_blocks.{level}"
        else:
            block = f"decoder.up_blocks.{num_up - 1 - int(level)}"
        if value.ndim == 4 and layer in ("q", "k", "v", "proj_out"):
            value = value[:, :, 0, 0]
        out[f"{block}.attentions.{index}.{_ATTENTION_NAMES.get(layer, layer)}.{leaf}"] = value
    return out


def _check_fits(converted: dict[str, torch.Tensor], source: Mapping[str, torch.Tensor], model: AutoencoderKL, where: str) -> None:
    """Refuse, naming the first key, a converted state dict that does not fill ``model`` exactly:
    a weight the model has and the file lacks, a shape that differs, or a VAE weight in the file
    that no part of the model takes (the file has more levels, blocks or attention than the config)."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in converted:
            raise UsageError(f"VAE checkpoint {where}: it has no weight for {key}")
        if tuple(converted[key].shape) != tuple(tensor.shape):
            raise UsageError(f"VAE checkpoint {where}: {key} is {tuple(converted[key].shape)} in the file but "
                             f"{tuple(tensor.shape)} in the config")
    used = {converted[key].untyped_storage().data_ptr() for key in expected}
    for key, tensor in source.items():
        if key.startswith(_LDM_VAE_PARTS) and tensor.untyped_storage().data_ptr() not in used:
            raise UsageError(f"VAE checkpoint {where}: its weight {key} has no place in the config")


def _single_file_state(spec: VAESpec, file: Path | None, config_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of an original single-file checkpoint (latent diffusion's layout) under
    diffusers' names, checked to fill the config ``config_name`` exactly, and that config.

    Diffusers' own single-file conversion renames the keys, the attention of encoder and decoder
    levels is renamed on top (:func:`_level_attentions`), and the result must fit a model built
    on the ``meta`` device (:func:`_check_fits`; no memory). ``file`` is ``None`` for a preset
    whose file is on the hub."""
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS, convert_ldm_vae_checkpoint

    if file is None:
        from huggingface_hub import hf_hub_download

        preset = VAE_PRESETS[spec.name]
        assert preset.file is not None
        file = Path(hf_hub_download(preset.source, preset.file, revision=spec.revision))
    config = vae_config(VAESpec(config_name))
    state = read_single_file(file)
    prefix = next((p for p in LDM_VAE_KEYS if any(k.startswith(p) for k in state)), "")
    source = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    converted = _level_attentions(convert_ldm_vae_checkpoint(source, config), len(config["up_block_types"]))
    with torch.device("meta"):
        shapes = AutoencoderKL.from_config(config)
    _check_fits(converted, source, shapes, f"{file} does not fit config '{config_name}'")
    return {k: converted[k] for k in shapes.state_dict()}, config


def check_vae_file(spec: VAESpec) -> None:
    """Read a single-file VAE and check that it fits its config, without building the model;
    nothing for any other VAE. Lets stage one refuse a bad file before it writes anything.

    Raises:
        UsageError: the file cannot be read, or does not fit its config.
    """
    try:
        file, config = _single_file(spec)
        if config is not None:
            _single_file_state(spec, file, config)
    except Exception as exc:
        raise _cannot_load(spec, exc) from exc


def _load_single_file(spec: VAESpec, file: Path | None, config_name: str) -> AutoencoderKL:
    """A VAE from a single-file checkpoint and the diffusers config it is read with."""
    state, config = _single_file_state(spec, file, config_name)
    model = AutoencoderKL.from_config(config)
    model.load_state_dict(state, strict=True)
    return model


def vae_config(spec: VAESpec) -> dict[str, Any]:
    """The VAE's config (geometry, ``scaling_factor``, ...) without loading its weights; found
    where :func:`load_vae` would find them.

    Raises:
        UsageError: the config cannot be read (missing folder, unknown id, no network).
    """
    if spec.name in BUNDLED_CONFIGS:
        return dict(BUNDLED_CONFIGS[spec.name])
    try:
        _, config = _single_file(spec)
        if config is not None:
            return vae_config(VAESpec(config))
        if spec.name in TINY_VAES:
            return dict(_build_tiny_vae(spec.name).config)
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
