"""The shard plan: a seeded permutation of the source listing cut into fixed-size shards, and the
fingerprints that decide whether a resume or an added group may write into an existing cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from repa_cache.cache.codec import FEATURE_CODECS, FLOAT16
from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import CODE_VERSION, CROP_RULE, FORMAT_VERSION, VIEW_NAMES, CacheMeta
from repa_cache.cache.storage import store_path
from repa_cache.pipeline.source import SourceListing
from repa_cache.stages.registry import check_teacher_name
from repa_cache.stages.vae_presets import check_vae_name

#: ``--resolution`` bounds (a multiple of 8, so that the SD-VAE's 8x downsampling is exact).
MIN_RESOLUTION = 64
MAX_RESOLUTION = 4096
#: ``--shard-size`` bound: a shard is decoded and encoded in one worker's memory
#: (65536 crops of 256 px are 12 GiB of pixels).
MAX_SHARD_SIZE = 65536


@dataclass(frozen=True)
class PrecomputeConfig:
    """Everything ``repa precompute`` needs; defaults follow the REPA recipe (256 px, SD-VAE ft-ema,
    DINOv2-B). The resolved config is stored in the cache's root metadata."""

    data: str
    out: str
    resolution: int = 256
    vae: str | None = None  # None: the cache's VAE when resuming, else stages.vae.DEFAULT_VAE
    vae_revision: str | None = None
    vae_config: str | None = None  # the diffusers config a single-file --vae is read with (stages.vae_presets)
    teachers: tuple[str, ...] = ("dinov2-vit-b",)
    teacher_checkpoints: dict[str, str] = field(default_factory=dict)
    # teacher -> "FIRST[-LAST]": also store the hidden tokens entering block FIRST (HASTE; stages.teachers)
    teacher_layers: dict[str, str] = field(default_factory=dict)
    registers: bool = False  # also store the register tokens of teachers that have them (a group that has them keeps them)
    latent_norm: str = "vae"  # dataset: also compute the latents' per-channel statistics (repa latent-stats)
    flip: bool = False  # REPA trains on the stored image only; --flip adds the mirrored view (2x the time and bytes)
    shard_size: int = 256
    batch_size: int = 64
    device: str = "auto"
    workers: int | None = None
    scheduler: str | None = None
    seed: int = 0
    feature_dtype: str = "float16"
    feature_codec: str = "float16"  # cache.codec: float16 stores feature_dtype; int8 quantises per token
    precision: str | None = None  # fp32 or bf16 (autocast); None: a group's own when resuming it, else fp32
    processes: bool = True
    repair: bool = False  # re-encode the shards `repa verify` finds damaged, also in committed groups
    quiet: bool = False

    @property
    def views(self) -> tuple[str, ...]:
        return VIEW_NAMES if self.flip else VIEW_NAMES[:1]


def recorded_settings(out: str) -> dict[str, Any]:
    """The settings the cache at ``out`` records in its root metadata (resolution, shard size,
    flips, seed), as :class:`PrecomputeConfig` fields: extending or resuming it takes them as the
    defaults, so only a changed value is typed (and then refused as a change). Empty when ``out``
    holds no cache (a path that is something else is refused later, by the precompute itself)."""
    from repa_cache.cache.reader import open_meta

    root = store_path(out)
    if not (root / "zarr.json").is_file():
        return {}
    _, meta = open_meta(root)
    return {"resolution": meta.resolution, "shard_size": meta.shard_size, "flip": meta.views == VIEW_NAMES, "seed": meta.seed}


def check_config(cfg: PrecomputeConfig) -> None:
    """Refuse values that cannot work, before any work starts (one line each).

    ``resolution`` must be a multiple of 8 in [:data:`MIN_RESOLUTION`, :data:`MAX_RESOLUTION`];
    ``shard_size`` in [1, :data:`MAX_SHARD_SIZE`]; ``batch_size`` and ``workers`` (when given) at
    least 1; every teacher a registry name or ``timm:MODEL_ID``; the output folder not the data
    folder or inside it (symlinks resolved), or the cache would be listed as data by every later
    run. These need no torch and come first; then ``device`` must be a device torch knows
    (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and, without a remote scheduler, one this machine has
    (a remote cluster's workers resolve it themselves).

    Raises:
        UsageError: the first value that breaks a rule.
    """
    r = cfg.resolution
    if r % 8 or not MIN_RESOLUTION <= r <= MAX_RESOLUTION:
        raise UsageError(f"--resolution must be a multiple of 8 in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], not {r}")
    if not 1 <= cfg.shard_size <= MAX_SHARD_SIZE:
        raise UsageError(f"--shard-size must be in [1, {MAX_SHARD_SIZE}], not {cfg.shard_size}")
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {cfg.batch_size}")
    if cfg.latent_norm not in ("vae", "dataset"):
        raise UsageError(f"--latent-norm must be vae or dataset, not '{cfg.latent_norm}'")
    if cfg.feature_codec not in FEATURE_CODECS:
        raise UsageError(f"--feature-codec must be one of {', '.join(FEATURE_CODECS)}, not '{cfg.feature_codec}'")
    if cfg.feature_codec != FLOAT16 and cfg.feature_dtype != "float16":
        raise UsageError(f"--feature-codec {cfg.feature_codec} quantises the encoder's float32 output; leave --feature-dtype at float16")
    if cfg.workers is not None and cfg.workers < 1:
        raise UsageError(f"--workers must be at least 1, not {cfg.workers}")
    for name in cfg.teachers:
        check_teacher_name(name)
    check_vae_name(cfg.vae, cfg.vae_config)
    out, data = store_path(cfg.out), store_path(cfg.data)
    if out.is_local and out.is_within(data):
        raise UsageError(
            f"output folder {cfg.out} is inside the data folder {cfg.data} "
            f"({out.resolve()} in {data.resolve()}); write the cache somewhere else"
        )
    from repa_cache.stages.devices import parse_device, resolve_device  # torch: after every check that needs none

    if cfg.scheduler is None:
        resolve_device(cfg.device)
    else:  # the remote workers have the GPUs: check the name only
        parse_device(cfg.device)


def sample_order(num_items: int, seed: int) -> np.ndarray:
    """Cache index -> listing position: a seeded permutation, so every contiguous block of the
    cache is already class-mixed."""
    return np.random.default_rng(seed).permutation(num_items)


def base_fingerprint(listing: SourceListing, cfg: PrecomputeConfig) -> dict[str, Any]:
    """The part of the fingerprint every group of a cache shares."""
    return {
        "format_version": FORMAT_VERSION,
        "listing": listing.fingerprint(),
        "num_samples": len(listing.items),
        "resolution": cfg.resolution,
        "crop": CROP_RULE,
        "views": list(cfg.views),
        "seed": cfg.seed,
        "shard_size": cfg.shard_size,
    }


def make_plan(listing: SourceListing, cfg: PrecomputeConfig) -> tuple[CacheMeta, pa.Table]:
    """Root metadata and plan table (cache index -> source key, label) for a new cache."""
    items = listing.items
    order = sample_order(len(items), cfg.seed)
    labels = pa.array(items.labels[order], pa.int32())
    plan = pa.table(
        {
            "index": pa.array(np.arange(len(items)), pa.int64()),
            # keys to arrow in listing order, then reordered there: faster than reordering the strings
            "key": pa.array(items.keys, pa.string()).take(pa.array(order)),
            "label": labels,
            "class_name": pa.array(listing.class_names, pa.string()).take(labels),
            "source_position": pa.array(order, pa.int64()),
            "source_bytes": pa.array(items.sizes[order], pa.int64()),
        }
    )
    meta = CacheMeta(
        format_version=FORMAT_VERSION,
        code_version=CODE_VERSION,
        num_samples=len(items),
        shard_size=cfg.shard_size,
        resolution=cfg.resolution,
        crop=CROP_RULE,
        views=cfg.views,
        seed=cfg.seed,
        class_names=listing.class_names,
        source=listing.describe(),
        base_fingerprint=base_fingerprint(listing, cfg),
    )
    return meta, plan
