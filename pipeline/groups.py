"""Describe a feature group before any weights are loaded: model ids, preprocessing, geometry,
storage, and the group's fingerprint. Runs in the driver process, so it only reads configs
(real models are built on the ``meta`` device: no weights, no memory)."""

from __future__ import annotations

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import FORMAT_VERSION, LATENTS, ArraySpec, CacheMeta, GroupMeta, teacher_group
from repa_cache.cache.writer import DEFAULT_CODEC
from repa_cache.stages.devices import check_precision
from repa_cache.stages.teachers import get_teacher, teacher_metadata
from repa_cache.stages.vae import TINY_VAES, VAESpec, check_vae_file, latent_norm, vae_config
from repa_cache.stages.vae_presets import VAE_PRESETS

FEATURE_DTYPES = ("float16", "float32")
#: ``--precision`` of stage one: the encoders' arithmetic (``bf16``: autocast). No ``auto``: the
#: precision is part of each group's fingerprint, so it must not depend on the machine.
STAGE_ONE_PRECISIONS = ("fp32", "bf16")


def vae_group(meta: CacheMeta, spec: VAESpec, precision: str = "fp32") -> GroupMeta:
    """The latents group: posterior mean and std, float32, one per view. ``precision`` is the
    arithmetic of the encoder (``bf16``: autocast); it is part of the fingerprint. The latent
    normalisation comes from the VAE's own config."""
    check_precision(precision, allowed=STAGE_ONE_PRECISIONS)
    config = vae_config(spec)
    check_vae_file(spec)  # a single file must fit its config before anything is written
    down = 2 ** (len(config["block_out_channels"]) - 1)
    if meta.resolution % down:
        raise UsageError(f"--resolution {meta.resolution} is not divisible by the VAE's downsampling factor {down}")
    channels = int(config["latent_channels"])
    side = meta.resolution // down
    norm = latent_norm(config)
    if norm.channels not in (None, channels):
        raise UsageError(f"the VAE config has per-channel latent statistics for {norm.channels} channels, but {channels} latent channels")
    model = {
        "id": spec.name,
        "revision": spec.revision,
        "tiny": spec.name in TINY_VAES,
        "class": "AutoencoderKL",
        "latent_norm": norm.to_json(),
        "latent_channels": channels,
        "downsample_factor": down,
        "latent_size": side,
        "input_range": "[-1, 1] = pixel / 127.5 - 1",
        "stored": "posterior mean and std (sample = mean + std * eps, then normalised with latent_norm)",
        "precision": precision,
    }
    identity: dict[str, object] = {"id": spec.name, "revision": spec.revision, "precision": precision}
    if spec.config is not None:  # a single file: the config it is read with is part of what it is
        model["config"] = identity["config"] = spec.config
    if spec.name in VAE_PRESETS:
        model["source"] = VAE_PRESETS[spec.name].source
    arrays = tuple(ArraySpec(n, (channels, side, side), "float32", DEFAULT_CODEC) for n in ("mean", "std"))
    fingerprint = {
        "base": meta.base_fingerprint,
        "group": LATENTS,
        "model": identity,
        "arrays": [a.to_json() for a in arrays],
        "format_version": FORMAT_VERSION,
    }
    return GroupMeta(LATENTS, "latents", model, arrays, fingerprint)


def teacher_group_meta(meta: CacheMeta, name: str, dtype: str, checkpoint: str | None = None, precision: str = "fp32",
                       layers: tuple[int, int | None] | None = None, registers: bool = False) -> GroupMeta:
    """A teacher's group: final-norm patch tokens and CLS, per view, computed in ``precision``;
    with ``layers`` (``--teacher-layers FIRST[-LAST]``, 1-based blocks) also the hidden tokens
    entering block FIRST, which a trainer runs through blocks FIRST..LAST (HASTE). A group without
    hidden tokens has exactly the metadata and fingerprint it always had. With ``registers`` a
    teacher with register tokens also stores them (``--registers``), the same way."""
    check_precision(precision, allowed=STAGE_ONE_PRECISIONS)
    if dtype not in FEATURE_DTYPES:
        raise UsageError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}, not '{dtype}'")
    model = teacher_metadata(get_teacher(name), meta.resolution, checkpoint, precision, layers, registers)
    arrays: tuple[ArraySpec, ...] = (
        ArraySpec("patch", (model["num_tokens"], model["dim"]), dtype, DEFAULT_CODEC),
        ArraySpec("cls", (model["dim"],), dtype, DEFAULT_CODEC),
    )
    keys: tuple[str, ...] = ("name", "timm_id", "mean", "std", "input_size", "interpolation", "antialias", "precision")
    if "hidden" in model:
        arrays += (ArraySpec("hidden", (model["hidden"]["num_tokens"], model["dim"]), dtype, DEFAULT_CODEC),)
        keys += ("hidden",)
    if "registers" in model:
        arrays += (ArraySpec("registers", (model["registers"]["num_tokens"], model["dim"]), dtype, DEFAULT_CODEC),)
        keys += ("registers",)
    fingerprint = {
        "base": meta.base_fingerprint,
        "group": teacher_group(name),
        "model": {k: model[k] for k in keys},
        "arrays": [a.to_json() for a in arrays],
        "format_version": FORMAT_VERSION,
    }
    return GroupMeta(teacher_group(name), "teacher", model, arrays, fingerprint)
