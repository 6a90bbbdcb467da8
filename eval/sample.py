"""``repa sample``: draw images from a trained checkpoint and export them for FID.

The job needs the run folder (or one checkpoint file) and the VAE's weights, nothing else: the
checkpoint's model card names the model shape, the interpolant, the number of classes, the latent
normalisation and the VAE (id, revision and weights hash). It loads the EMA weights, integrates
with :mod:`repa_cache.eval.samplers`, decodes with that VAE and writes::

    OUT/sample.json         the job's settings (a rerun with other settings is refused)
    OUT/images/000000.png   one PNG per sample, written atomically
    OUT/samples.npz         ADM layout: arr_0 uint8 (N, H, W, 3), arr_1 int64 labels (N,)
    OUT/grid.png            the first samples in a grid

Sample ``i`` is made by rank ``i % world`` from the seed ``(seed, i)`` (noise, SDE increments and
its random class, or for a GMem model its memory-bank entry, ``--bank``), so the images do not
depend on the world size or the batch size. Rerunning
the command resumes: PNGs already present are skipped, and the npz is assembled from the PNGs
once all of them exist. Under torchrun the ranks share the work and rank 0 assembles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor

from repa_cache.cache.errors import UsageError, unknown_name
from repa_cache.cache.format import LatentNorm, teacher_group
from repa_cache.cache.progress import Progress
from repa_cache.cache.storage import atomic_file
from repa_cache.eval.config import SampleConfig
from repa_cache.eval.images import assemble_npz, make_grid, npz_array_info, png_name, write_png
from repa_cache.eval.samplers import SAMPLERS, SamplerConfig, bank_choices, check_guidance_interval, sample_joint, sample_labels
from repa_cache.stages.devices import check_precision, resolve_device
from repa_cache.train.checkpoint import ModelCard, load_checkpoint
from repa_cache.train.config import SamplingDefaults
from repa_cache.train.methods import Method
from repa_cache.train.methods.gmem import MemoryBank, open_bank
from repa_cache.train.model import SiTConfig
from repa_cache.train.noise import SampleNoise
from repa_cache.train.student import LoadedModel, load_student, weights_file

logger = logging.getLogger(__name__)

IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
JOB_FILE = "sample.json"
#: Settings that make the images what they are; a resume must keep them.
IDENTITY_FIELDS = ("checkpoint", "sampler", "steps", "heun", "cfg_scale", "guidance_interval", "classes",
                   "seed", "last_t", "cls_cfg_scale", "bank", "weights")
#: What a job file written before a field existed meant by its absence.
IDENTITY_DEFAULTS: dict[str, Any] = {"weights": "ema"}


def local_rank() -> int:
    """This process's GPU index on its node under torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


# --------------------------------------------------------------------------------------------
# the model


# --------------------------------------------------------------------------------------------
# decoding and image files


@dataclass(frozen=True)
class LatentDecoder:
    """A VAE and the latent normalisation of the model: ``decode(norm.from_model(z))``."""

    vae: Any
    norm: LatentNorm

    @torch.no_grad()
    def __call__(self, z: Tensor, batch_size: int = 32) -> np.ndarray:
        """Model latents (B, C, h, w) -> uint8 images (B, H, W, 3), as ADM/REPA quantise them."""
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        out = []
        for chunk in z.split(batch_size):
            lat = self.norm.from_model(chunk.to(device, torch.float32))  # (b, C, h, w) in the VAE's space
            img = self.vae.decode(lat.to(dtype)).sample.float()  # (b, 3, H, W) in [-1, 1]
            img = ((img + 1) * 127.5).clamp(0, 255).to(torch.uint8)  # truncation, as ADM and REPA
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())  # (b, 3, H, W) -> (b, H, W, 3)
        return np.concatenate(out)


def load_decoder(card: ModelCard, device: torch.device | str, vae: str | None = None) -> LatentDecoder:
    """The VAE named in the model card (or ``vae``, a local folder holding it) with the card's
    latent normalisation.

    The VAE's weights must hash to the card's ``weights_sha256``: decoding with another VAE than
    the one that encoded the training latents gives wrong images, so it is refused.

    Raises:
        UsageError: the VAE cannot be loaded, or it has other weights.
    """
    from repa_cache.stages.hashing import state_dict_sha256
    from repa_cache.stages.vae import VAESpec, load_vae
    from repa_cache.stages.vae_presets import SINGLE_FILE_SUFFIXES

    named = card.vae.get("id")
    if vae is None and not named:
        raise UsageError("the checkpoint does not name its VAE; pass a local copy with --vae")
    if vae is None:
        spec = VAESpec.of_record(card.vae)
    else:  # a local copy: a single file is read with the config the card records
        spec = VAESpec(vae, None, card.vae.get("config") if Path(vae).suffix.lower() in SINGLE_FILE_SUFFIXES else None)
    model = load_vae(spec, device, torch.float32)
    recorded = card.vae.get("weights_sha256")
    if not recorded:
        logger.warning("the checkpoint records no VAE weights hash; decoding with '%s' unchecked", spec.name)
    elif state_dict_sha256(model) != recorded:
        raise UsageError(f"VAE '{spec.name}' has other weights than the VAE '{named}' the model was trained with "
                         f"(sha256 {recorded[:12]}...)")
    return LatentDecoder(model, card.norm)


def rank_indices(num: int, rank: int, world: int) -> list[int]:
    """Sample indices of one rank: ``i`` with ``i % world == rank``. Ranks cover ``range(num)``
    exactly once between them, whatever ``num``."""
    return list(range(rank, num, world))


def grid_title(step: int | None, scfg: SamplerConfig) -> str:
    """A grid's header: the training step of the weights and how they were sampled."""
    guide = f"cfg {scfg.cfg_scale:g}" + (f" on t in [{scfg.guidance_interval[0]:g}, {scfg.guidance_interval[1]:g}]"
                                         if scfg.cfg_scale != 1 and tuple(scfg.guidance_interval) != (0.0, 1.0) else "")
    sampler = f"{scfg.sampler.upper()}{' Heun' if scfg.heun else ''}, {scfg.steps} steps"
    return f"step {step if step is not None else '?'} | {guide} | {sampler}"


@dataclass
class SampleResult:
    """What a sampling job did (on this rank) and where its outputs are."""

    out: Path
    num: int
    written: int  # PNGs this rank wrote in this run
    skipped: int  # PNGs of this rank that were already there
    npz: Path | None
    grid: Path | None
    checkpoint: Path | None
    step: int | None
    seconds: float
    rank: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        where = f" npz {self.npz}" if self.npz else ""
        return (f"{self.out}: {self.num} samples, {self.written} written, {self.skipped} already present "
                f"(rank {self.rank}/{self.world_size}) in {self.seconds:.1f}s;{where}")


@dataclass
class _Job:
    """The resolved settings of a sampling job (written to OUT/sample.json)."""

    checkpoint: str
    num: int
    sampler: str
    steps: int
    heun: bool
    cfg_scale: float
    guidance_interval: list[float]
    classes: list[int]
    seed: int
    last_t: float
    cls_cfg_scale: float | None = None  # guidance of a jointly denoised CLS token (REG); None: cfg_scale
    bank: str | None = None  # the memory bank of a GMem model (a cache or a .npy)
    weights: str = "ema"  # "ema" or "raw"
    # Read from the checkpoint (fixed by it, so not part of the identity):
    path: str = "linear"
    num_classes: int = 0
    step: int | None = None
    conditioning: str = "class"  # "class" (labels, in the npz's arr_1) or "bank" (GMem: no labels)

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}


def _dist_info() -> tuple[int, int]:
    """(rank, world size): from an initialised process group, else torchrun's environment (then a
    gloo group is started: the job needs only a barrier, and ranks may finish far apart)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available():
        dist.init_process_group("gloo", timeout=timedelta(hours=12))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _previous_job(out: Path, job: _Job) -> dict[str, Any] | None:
    """The settings stored in ``out``; refuses a folder of other settings or of other files."""
    job_file = out / JOB_FILE
    if job_file.is_file():
        old = json.loads(job_file.read_text())
        mine = job.identity()
        changed = [k for k in IDENTITY_FIELDS if old.get(k, IDENTITY_DEFAULTS.get(k)) != mine[k]]
        if changed:
            details = "; ".join(f"{k}: {old.get(k)} -> {mine[k]}" for k in changed)
            raise UsageError(f"{out} holds samples made with other settings ({details}); use a new --out")
        return old
    if out.is_file():
        raise UsageError(f"output path {out} is a file, not a folder")
    if out.exists() and any(p.name != IMAGES_DIR and not p.name.startswith(".") for p in out.iterdir()):
        raise UsageError(f"output folder {out} is not empty and holds no {JOB_FILE}; use a new --out")
    return None


def _check(cfg: SampleConfig) -> None:
    """Refuse settings that cannot work (one line each), before the checkpoint is read; the
    sampler's settings are checked together once the method's fill those left unset."""
    if cfg.num <= 0:
        raise UsageError(f"--num must be positive, got {cfg.num}")
    if cfg.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.grid < 0:
        raise UsageError(f"--grid must be >= 0, got {cfg.grid}")
    check_precision(cfg.precision)
    if any(c < 0 for c in cfg.classes):
        raise UsageError(f"--class takes class ids >= 0, got {list(cfg.classes)}")
    if cfg.cls_cfg_scale is not None and not (math.isfinite(cfg.cls_cfg_scale) and cfg.cls_cfg_scale >= 0):
        raise UsageError(f"--cls-cfg must be a finite number >= 0, got {cfg.cls_cfg_scale}")
    if cfg.guidance_interval is not None:
        check_guidance_interval(cfg.guidance_interval)
    if cfg.cfg_scale is not None and not (math.isfinite(cfg.cfg_scale) and cfg.cfg_scale >= 0):
        raise UsageError(f"--cfg must be a finite number >= 0, got {cfg.cfg_scale}")
    if cfg.steps is not None and cfg.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.sampler is not None and cfg.sampler not in SAMPLERS:
        raise unknown_name("sampler", cfg.sampler, list(SAMPLERS))


def sampler_config(cfg: SampleConfig, method: SamplingDefaults) -> tuple[SampleConfig, SamplerConfig]:
    """The job with its unset sampler settings taken from the ``method``'s (a checkpoint's
    :attr:`~repa_cache.train.checkpoint.ModelCard.sampling_defaults`), and the sampler's part of it."""
    cfg = cfg.resolve(method)
    assert cfg.sampler is not None and cfg.steps is not None and cfg.heun is not None
    assert cfg.cfg_scale is not None and cfg.guidance_interval is not None
    return cfg, SamplerConfig(sampler=cfg.sampler, steps=cfg.steps, heun=cfg.heun, cfg_scale=cfg.cfg_scale,
                              guidance_interval=cfg.guidance_interval)


def open_sampling_bank(card: ModelCard, method: Method, config: SiTConfig, source: str | Path | None) -> MemoryBank | None:
    """The memory bank a model samples its conditions from (GMem: the CLS tokens of the card's first
    teacher), or None for a class-conditioned model. One-line UsageErrors: a GMem model without a
    bank, a bank for a class-conditioned model, or a bank that does not fit the model."""
    if not method.samples_from_bank():
        if source is not None:
            raise UsageError(f"--bank applies to models trained with --method gmem; this one was trained with --method {method.name}")
        return None
    if source is None:
        raise UsageError(f"this model (--method {method.name}) is conditioned on memory-bank entries, not classes: pass --bank "
                         "CACHE (a cache with its teacher's CLS tokens) or --bank FILE.npy (from repa gmem-bank)")
    teacher = card.teachers[0]
    weights = card.trained_on.weights.get(teacher_group(teacher))
    return open_bank(source, teacher, config.z_dims[0], weights)


def sample(ckpt: str | Path, out: str | Path, cfg: SampleConfig | None = None) -> SampleResult:
    """Sample ``cfg.num`` images from a checkpoint into ``out`` (resumable, torchrun-aware).

    Needs only the checkpoint and the VAE it names (or ``cfg.vae``, a local copy of it); the
    training cache is not read.

    Args:
        ckpt: a run folder (its newest weights) or a checkpoint file (full or EMA-only).
        out: output folder (see the module docstring for its layout).
        cfg: the job's settings (default: :class:`SampleConfig`'s); the sampler settings it leaves
            unset are the ones the checkpoint's model card records for its method.

    Raises:
        UsageError: bad settings, an unknown or unreadable checkpoint, a VAE with other weights, or
            an ``out`` of other settings.
    """
    t0 = time.perf_counter()
    cfg = cfg if cfg is not None else SampleConfig()
    _check(cfg)
    ckpt_path = weights_file(ckpt, cfg.weights).resolve()
    ckpt_file = load_checkpoint(ckpt_path)  # its card; the weights are read only if a model is built
    cfg, scfg = sampler_config(cfg, ckpt_file.card.sampling_defaults)
    out = Path(out)
    rank, world = _dist_info()
    device = resolve_device(cfg.device, local_rank())

    bank_id = None if cfg.bank is None else (cfg.bank if "://" in cfg.bank else str(Path(cfg.bank).resolve()))
    job = _Job(str(ckpt_path), cfg.num, scfg.sampler, scfg.steps, scfg.heun, scfg.cfg_scale,
               list(scfg.guidance_interval), list(cfg.classes), cfg.seed, scfg.last_t, cfg.cls_cfg_scale, bank_id, cfg.weights)
    old = _previous_job(out, job)
    images = out / IMAGES_DIR
    present = {p.name for p in images.iterdir()} if images.is_dir() else set()
    mine = rank_indices(cfg.num, rank, world)
    todo = [i for i in mine if png_name(i) not in present]

    loaded: LoadedModel | None = None
    bank: MemoryBank | None = None
    if todo or old is None:
        loaded = load_student(ckpt_file, device, cfg.weights)
        job.path, job.num_classes, job.step = loaded.card.path, loaded.config.num_classes, loaded.step
        bank = open_sampling_bank(loaded.card, loaded.method, loaded.config, cfg.bank)
        job.conditioning = "class" if bank is None else "bank"
        if bank is not None and job.classes:
            raise UsageError("--class does not apply to a --method gmem model: each sample's condition is a --bank entry")
        bad = [c for c in job.classes if c >= job.num_classes]
        if bad:
            raise UsageError(f"--class {bad[0]} is not a class of this model (it has {job.num_classes})")
    else:
        job.path, job.num_classes, job.step = old["path"], old["num_classes"], old.get("step")
        job.conditioning = old.get("conditioning", "class")
    if rank == 0:
        images.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / JOB_FILE) as f:
            f.write(json.dumps(dataclasses.asdict(job), indent=1).encode())

    written = 0
    if todo:
        assert loaded is not None
        images.mkdir(parents=True, exist_ok=True)
        decoder = load_decoder(loaded.card, device, cfg.vae)
        written = _sample_indices(loaded, decoder, dataclasses.replace(scfg, path=job.path), job, todo, images,
                                  cfg.batch_size, device, cfg.precision, cfg.quiet or rank != 0, bank)
    if world > 1:
        dist.barrier()
    npz = grid_path = None
    if rank == 0:
        labels = (sample_labels(job.seed, range(cfg.num), job.num_classes, job.classes).numpy()
                  if job.conditioning == "class" else None)  # a bank-conditioned sample has no class
        npz = _assemble_if_stale(images, cfg.num, out / NPZ_NAME, labels)
        if cfg.grid:
            shown = range(min(cfg.grid, cfg.num))
            tiles = np.stack([np.asarray(Image.open(images / png_name(i)).convert("RGB")) for i in shown])  # (n, H, W, 3)
            grid_path = out / GRID_NAME
            write_png(grid_path, make_grid(tiles, labels=None if labels is None else [f"class {labels[i]}" for i in shown],
                                           title=grid_title(job.step, scfg)))
    return SampleResult(out, cfg.num, written, len(mine) - len(todo), npz, grid_path, ckpt_path, job.step,
                        time.perf_counter() - t0, rank, world)


def _assemble_if_stale(images: Path, num: int, npz: Path, labels: np.ndarray | None) -> Path:
    """Rebuild the npz unless it already holds ``num`` samples and is newer than every PNG."""
    if npz.is_file():
        try:
            shape, _ = npz_array_info(npz)
            newest = max((images / png_name(i)).stat().st_mtime for i in range(num))
            if shape[0] == num and npz.stat().st_mtime >= newest:
                return npz
        except (OSError, ValueError, KeyError):
            pass
    return assemble_npz(images, num, npz, labels)


def sample_batch(model: torch.nn.Module, method: Method, config: SiTConfig, scfg: SamplerConfig, seed: int,
                 indices: list[int], classes: tuple[int, ...] | list[int] = (), cls_cfg_scale: float | None = None,
                 device: torch.device | str = "cpu", precision: str = "fp32", bank: MemoryBank | None = None) -> Tensor:
    """Model latents (B, C, h, w) of samples ``indices`` of a job seeded ``seed``.

    Each sample's stream gives its initial latent noise first, then the noise of each extra state
    component the method denoises (REG's CLS token), then the SDE increments; its class comes from
    ``classes`` or its seed, or for a method that samples from a memory bank (GMem) its condition is
    the ``bank`` entry its seed draws (:func:`bank_choices`). Guidance: ``scfg.cfg_scale`` on the
    latent, ``cls_cfg_scale`` (default the same) on the extra components, where 0 takes their
    conditional drift alone, as REG's sampler does; the unconditional branch gets the method's null
    condition."""
    shape = (config.in_channels, config.input_size, config.input_size)
    extra_shapes = method.extra_shapes(config)
    cls_scale = cls_cfg_scale if cls_cfg_scale is not None else scfg.cfg_scale
    extra_scale = None if cls_scale == 0 else cls_scale
    scales: list[float | None] = [scfg.cfg_scale, *[extra_scale] * len(extra_shapes)]
    noise = SampleNoise(seed, indices, device)
    x1 = noise.randn(shape)  # (B, C, h, w) initial noise, first draw of each sample's stream
    extras = [noise.randn(s) for s in extra_shapes]  # then the noise of each extra component
    if method.samples_from_bank():
        if bank is None:
            raise UsageError(f"a --method {method.name} model samples from a memory bank: pass --bank")
        y = bank.entries(bank_choices(seed, indices, bank.size)).to(device)  # (B, Z)
    else:
        y = sample_labels(seed, indices, config.num_classes, classes).to(device)  # (B,)
    null = method.null_condition(y, config.num_classes)
    return sample_joint(model, [x1, *extras], y, scfg, config.num_classes, scales, noise, precision, null)[0]


def _sample_indices(
    loaded: LoadedModel,
    decoder: LatentDecoder,
    scfg: SamplerConfig,
    job: _Job,
    todo: list[int],
    images: Path,
    batch_size: int,
    device: torch.device,
    precision: str,
    quiet: bool,
    bank: MemoryBank | None = None,
) -> int:
    """Sample, decode and write the PNGs of ``todo`` in batches; returns how many were written."""
    bar = Progress(len(todo), "sample", "img", quiet=quiet)
    if not quiet:  # the first count comes only after a whole batch: say at once what is running
        bar.write(f"sample: {len(todo)} img to write in batches of {batch_size}, {scfg.steps} {scfg.sampler} steps each, "
                  f"from step {job.step} on {device.type}", stream=sys.stderr)
    written = 0
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        z = sample_batch(loaded.model, loaded.method, loaded.config, scfg, job.seed, idx, job.classes, job.cls_cfg_scale,
                         device, precision, bank)
        pix = decoder(z, batch_size)  # (B, H, W, 3) uint8
        for i, img in zip(idx, pix):
            write_png(images / png_name(i), img)
        written += len(idx)
        bar.update(len(idx))
    bar.close()
    return written
