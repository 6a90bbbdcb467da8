"""Describe a feature group before any weights are loaded: model ids, preprocessing, geometry,
storage, and the group's fingerprint. Runs in the driver process, so it only reads configs
(real models are built on the ``meta`` device: no weights, no memory)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from cache.errors import UsageError
from cache.format import FORMAT_VERSION, LATENTS, ArraySpec, CacheMeta, GroupMeta, teacher_group
from cache.writer import DEFAULT_CODEC
from stages.teachers import TeacherSpec, get_teacher, teacher_input_size, token_grid
from stages.vae import TINY_VAE, VAESpec

FEATURE_DTYPES = ("float16", "float32")
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")


def vae_group(meta: CacheMeta, spec: VAESpec, precision: str = "fp32") -> GroupMeta:
    """The latents group: posterior mean and std, float32, one per view. ``precision`` is the
    arithmetic of the encoder (``bf16``: autocast); it is part of the fingerprint."""
    check_precision(precision)
    config = _vae_config(spec)
    down = 2 ** (len(config["block_out_channels"]) - 1)
    if meta.resolution % down:
        raise UsageError(f"--resolution {meta.resolution} is not divisible by the VAE's downsampling factor {down}")
    channels = int(config["latent_channels"])
    side = meta.resolution // down
    model = {
        "id": spec.name,
        "revision": spec.revision,
        "tiny": spec.name == TINY_VAE,
        "class": "AutoencoderKL",
        "scaling_factor": config.get("scaling_factor", 0.18215),
        "shift_factor": config.get("shift_factor"),
        "latent_channels": channels,
        "downsample_factor": down,
        "latent_size": side,
        "input_range": "[-1, 1] = pixel / 127.5 - 1",
        "stored": "posterior mean and std (sample = mean + std * eps, then scale)",
        "precision": precision,
    }
    arrays = tuple(ArraySpec(n, (channels, side, side), "float32", DEFAULT_CODEC) for n in ("mean", "std"))
    fingerprint = {
        "base": meta.base_fingerprint,
        "group": LATENTS,
        "model": {"id": spec.name, "revision": spec.revision, "precision": precision},
        "arrays": [a.to_json() for a in arrays],
        "format_version": FORMAT_VERSION,
    }
    return GroupMeta(LATENTS, "latents", model, arrays, fingerprint)


def _vae_config(spec: VAESpec) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    if spec.name == TINY_VAE:
        from stages.vae import load_vae

        return dict(load_vae(spec).config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hub deprecation chatter; the outcome is reported below
            return dict(AutoencoderKL.load_config(spec.name, revision=spec.revision))
    except Exception as e:  # noqa: BLE001 - offline, missing folder, bad id: one message
        raise UsageError(
            f"cannot load VAE '{spec.name}': {str(e).splitlines()[0][:200]}; pass a local diffusers folder with --vae"
        ) from e


def teacher_group_meta(meta: CacheMeta, name: str, dtype: str, checkpoint: str | None = None, precision: str = "fp32") -> GroupMeta:
    """A teacher's group: final-norm patch tokens and CLS, per view, computed in ``precision``."""
    check_precision(precision)
    if dtype not in FEATURE_DTYPES:
        raise UsageError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}, not '{dtype}'")
    spec = get_teacher(name)
    dim, prefix = _teacher_geometry(spec, meta.resolution)
    grid = token_grid(spec, meta.resolution)
    model = {
        "name": spec.name,
        "timm_id": spec.timm_id,
        "checkpoint": checkpoint,
        "tiny": spec.tiny,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input_size": teacher_input_size(spec, meta.resolution),
        "interpolation": "bicubic",
        "antialias": False,
        "patch_size": spec.patch_size,
        "grid": grid,
        "num_tokens": grid * grid,
        "dim": dim,
        "num_prefix_tokens": prefix,
        "token_rule": "final-norm patch tokens; CLS stored separately; register tokens dropped",
        "description": spec.description,
        "precision": precision,
    }
    arrays = (
        ArraySpec("patch", (grid * grid, dim), dtype, DEFAULT_CODEC),
        ArraySpec("cls", (dim,), dtype, DEFAULT_CODEC),
    )
    fingerprint = {
        "base": meta.base_fingerprint,
        "group": teacher_group(name),
        "model": {k: model[k] for k in ("name", "timm_id", "mean", "std", "input_size", "interpolation", "antialias", "precision")},
        "arrays": [a.to_json() for a in arrays],
        "format_version": FORMAT_VERSION,
    }
    return GroupMeta(teacher_group(name), "teacher", model, arrays, fingerprint)


def _teacher_geometry(spec: TeacherSpec, resolution: int) -> tuple[int, int]:
    """(embedding dim, number of prefix tokens) without loading weights."""
    from stages.teachers import load_teacher

    if spec.tiny:
        model = load_teacher(spec, resolution, pretrained=False)
    else:
        import timm

        with torch.device("meta"):
            model = timm.create_model(
                spec.timm_id, pretrained=False, img_size=teacher_input_size(spec, resolution), num_classes=0
            )
    return int(model.num_features), int(model.num_prefix_tokens)
