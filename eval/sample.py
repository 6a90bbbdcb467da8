"""``repa sample``: draw images from a trained checkpoint and export them for FID.

The job loads the EMA weights of a checkpoint, integrates with :mod:`eval.samplers`, decodes with
the VAE named in the cache the model was trained on (scale and shift read from that cache), and
writes::

    OUT/sample.json         the job's settings (a rerun with other settings is refused)
    OUT/images/000000.png   one PNG per sample, written atomically
    OUT/samples.npz         ADM layout: arr_0 uint8 (N, H, W, 3), arr_1 int64 labels (N,)
    OUT/grid.png            the first samples in a grid

Sample ``i`` is made by rank ``i % world`` from the seed ``(seed, i)`` (noise, SDE increments and
its random class), so the images do not depend on the world size or the batch size. Rerunning
the command resumes: PNGs already present are skipped, and the npz is assembled from the PNGs
once all of them exist. Under torchrun the ranks share the work and rank 0 assembles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from cache.errors import CacheError, RepaError, UsageError
from cache.format import LATENTS
from cache.reader import CacheReader
from cache.storage import StorePath, store_path
from eval.samplers import PRECISIONS, SampleNoise, SamplerConfig, sample_labels, sample_latents
from train.checkpoint import CKPT_DIR
from train.model import SiT, SiTConfig, sit_config

logger = logging.getLogger(__name__)

KIND_TRAIN = "repa-train-checkpoint"
KIND_EMA = "repa-ema-weights"
IMAGES_DIR = "images"
NPZ_NAME = "samples.npz"
GRID_NAME = "grid.png"
JOB_FILE = "sample.json"
_CKPT_NAME = re.compile(r"^(ema-)?step-(\d+)\.pt$")
#: Settings that make the images what they are; a resume must keep them.
IDENTITY_FIELDS = ("checkpoint", "sampler", "steps", "heun", "cfg_scale", "guidance_interval", "classes",
                   "seed", "last_t")


# --------------------------------------------------------------------------------------------
# checkpoints


@dataclass
class LoadedCheckpoint:
    """A student rebuilt from a checkpoint with its EMA weights, plus what it was trained on.

    Attributes:
        model: the SiT in eval mode with gradients off, on the requested device.
        model_config: its shape.
        train_config: the trainer's config dict (``TrainConfig.to_json()``).
        cache_info: fingerprints of the cache it was trained on (``groups``, ``weights``, ...).
        step: training step of the weights.
        path: the checkpoint file that was read.
    """

    model: SiT
    model_config: SiTConfig
    train_config: dict[str, Any]
    cache_info: dict[str, Any]
    step: int
    path: Path

    @property
    def null_class(self) -> int:
        return self.model_config.num_classes

    @property
    def path_type(self) -> str:
        """The interpolant the model was trained with (``"linear"`` unless the config says otherwise)."""
        transport = self.train_config.get("transport") or {}
        return str(transport.get("path", "linear"))

    @property
    def teachers(self) -> tuple[str, ...]:
        return tuple(self.train_config.get("teachers") or ())


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """The checkpoint file named by ``ckpt``: a file, or a run folder (its newest weights).

    In a run folder the highest step wins; at equal steps the EMA-only file is read (it is smaller).
    """
    path = Path(ckpt)
    if path.is_file():
        return path
    if not path.exists():
        raise UsageError(f"no checkpoint or run folder at {path}")
    found: list[tuple[int, int, Path]] = []
    ckpt_dir = path / CKPT_DIR
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _CKPT_NAME.match(p.name)
            if m:
                found.append((int(m.group(2)), 1 if m.group(1) else 0, p))
    if not found:
        raise UsageError(f"{path} holds no checkpoint (expected {CKPT_DIR}/ema-step-*.pt or step-*.pt)")
    return max(found)[2]


def _read_checkpoint(path: Path) -> dict[str, Any]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as e:  # noqa: BLE001 - whatever the file is, it is not ours
        raise UsageError(f"{path} is not a checkpoint of this tool (torch.load with weights_only cannot read it)") from e
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in (KIND_TRAIN, KIND_EMA):
        raise UsageError(
            f"{path} is not a checkpoint of this tool (kind {kind!r}; expected '{KIND_TRAIN}' or '{KIND_EMA}')")
    if "ema" not in state:
        raise UsageError(f"{path} has no EMA weights")
    return state


def _model_config(state: dict[str, Any], path: Path, cache: str | Path | None) -> SiTConfig:
    """The student's shape: stored in the checkpoint, else RUN/config.json, else derived from the
    trainer config and the cache (as the trainer derives it)."""
    if isinstance(state.get("model_config"), dict):
        return SiTConfig(**state["model_config"])
    run_config = path.parent.parent / "config.json"
    if path.parent.name == CKPT_DIR and run_config.is_file():
        model = json.loads(run_config.read_text()).get("model")
        if isinstance(model, dict):
            return SiTConfig(**model)
    cfg = state.get("config") or {}
    name = cfg.get("model")
    if not name:
        raise UsageError(f"cannot tell the model shape of {path}: no {run_config} and no model name in it")
    reader = open_training_cache(_existing_cache(path, cache, cfg.get("cache")), state.get("cache") or {}, groups=None)
    lat = reader.group(LATENTS).meta.model
    teachers = [g for g in reader.groups if g != LATENTS]
    wanted = list(cfg.get("teachers") or []) or [g.split("/", 1)[1] for g in teachers]
    overrides: dict[str, Any] = {
        "input_size": int(lat["latent_size"]),
        "in_channels": int(lat["latent_channels"]),
        "num_classes": len(reader.meta.class_names),
        "z_dims": tuple(int(reader.group(t).meta.model["dim"]) for t in wanted),
    }
    if cfg.get("encoder_depth") is not None:
        overrides["encoder_depth"] = int(cfg["encoder_depth"])
    return sit_config(name, **overrides)


def _strip_prefixes(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes, if any."""
    out = {}
    for key, value in weights.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_checkpoint_for_eval(
    ckpt: str | Path, device: torch.device | str = "cpu", cache: str | Path | None = None
) -> LoadedCheckpoint:
    """Rebuild the student of a checkpoint (file or run folder) with its EMA weights.

    Raises:
        UsageError: no such file, a file of an unknown format, or weights that do not fit the shape.
    """
    path = resolve_checkpoint(ckpt)
    state = _read_checkpoint(path)
    mcfg = _model_config(state, path, cache)
    model = SiT(mcfg)
    try:
        model.load_state_dict(_strip_prefixes(state["ema"]))
    except RuntimeError as e:
        raise UsageError(f"the EMA weights in {path} do not fit {mcfg}: {str(e).splitlines()[0]}") from e
    model = model.to(device).eval().requires_grad_(False)
    logger.info("loaded %s (step %s, EMA weights) on %s", path, state.get("step"), device)
    return LoadedCheckpoint(model, mcfg, dict(state.get("config") or {}), dict(state.get("cache") or {}),
                            int(state.get("step", 0)), path)


def open_training_cache(
    cache: str | Path, cache_info: dict[str, Any], groups: Sequence[str] | None = (LATENTS,)
) -> CacheReader:
    """Open the cache a checkpoint was trained on, refusing one with other fingerprints.

    ``cache_info`` is the checkpoint's ``cache`` entry; each opened group whose fingerprint it
    records must match.
    """
    reader = CacheReader(cache, groups=list(groups) if groups is not None else None)
    want = (cache_info or {}).get("groups") or {}
    for group, info in reader.groups.items():
        if group in want and want[group] != info.commit["fingerprint_hash"]:
            raise CacheError(
                f"group '{group}' of {reader.root} is not the one the checkpoint was trained on "
                "(fingerprints differ); pass the training cache with --cache")
    return reader


def _existing_cache(ckpt: Path, override: str | Path | None, recorded: str | None) -> StorePath:
    path = override if override is not None else recorded
    if not path:
        raise UsageError(f"{ckpt} does not name its training cache; pass --cache")
    if not store_path(path).exists():
        raise CacheError(f"the training cache {path} of {ckpt} is missing; pass --cache")
    return store_path(path)


def training_cache_path(loaded: LoadedCheckpoint, cache: str | Path | None) -> StorePath:
    """The cache to use: ``cache`` if given, else the one in the checkpoint's training config."""
    return _existing_cache(loaded.path, cache, loaded.train_config.get("cache"))


# --------------------------------------------------------------------------------------------
# decoding and image files


@dataclass(frozen=True)
class LatentDecoder:
    """The VAE of a cache and its latent scale: ``decode(z / scaling_factor + shift_factor)``."""

    vae: Any
    scaling_factor: float
    shift_factor: float

    @torch.no_grad()
    def __call__(self, z: Tensor, batch_size: int = 32) -> np.ndarray:
        """Model latents (B, C, h, w) -> uint8 images (B, H, W, 3), as ADM/REPA quantise them."""
        device, dtype = next(self.vae.parameters()).device, next(self.vae.parameters()).dtype
        out = []
        for chunk in z.split(batch_size):
            lat = chunk.to(device, torch.float32) / self.scaling_factor + self.shift_factor
            img = self.vae.decode(lat.to(dtype)).sample.float()  # (b, 3, H, W) in [-1, 1]
            img = ((img + 1) * 127.5).clamp(0, 255).to(torch.uint8)  # truncation, as ADM and REPA
            out.append(img.permute(0, 2, 3, 1).cpu().numpy())  # (b, H, W, 3)
        return np.concatenate(out)


def load_decoder(reader: CacheReader, device: torch.device | str, vae: str | None = None,
                 check_weights: bool = True) -> LatentDecoder:
    """The VAE named in the cache (or ``vae``, a local copy of it) with the cache's latent scale.

    When the cache records the encoder's weight hash, a VAE with other weights is refused: decoding
    with another VAE than the one that encoded the data gives wrong images.
    """
    from stages.hashing import state_dict_sha256
    from stages.vae import VAESpec, load_vae

    meta = reader.group(LATENTS).meta.model
    spec = VAESpec(vae if vae is not None else str(meta["id"]), None if vae is not None else meta.get("revision"))
    model = load_vae(spec, device, torch.float32)
    recorded = reader.group(LATENTS).commit.get("weights_sha256")
    if check_weights and recorded and state_dict_sha256(model) != recorded:
        raise UsageError(f"VAE '{spec.name}' has other weights than the one that encoded {reader.root}")
    return LatentDecoder(model, float(meta["scaling_factor"]), float(meta.get("shift_factor") or 0.0))


def write_png(path: Path, image: np.ndarray) -> None:
    """Write one uint8 (H, W, 3) image; a temporary name and a rename make it all-or-nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def png_name(index: int) -> str:
    """File name of sample ``index``: ``000123.png`` (6 digits at least, more past a million)."""
    return f"{index:06d}.png"


def rank_indices(num: int, rank: int, world: int) -> list[int]:
    """Sample indices of one rank: ``i`` with ``i % world == rank``. Ranks cover ``range(num)``
    exactly once between them, whatever ``num``."""
    return list(range(rank, num, world))


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write an ADM-readable npz: ``arr_0`` uint8 (N, H, W, 3) (plus ``arr_1`` labels), atomically."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
    tmp = path.with_name(f".{path.name}.tmp")
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": np.asarray(labels, np.int64)}
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    return path


def assemble_npz(images_dir: Path, num: int, out: Path, labels: np.ndarray | None = None) -> Path:
    """Build the npz from PNGs ``0 .. num-1`` without holding them all in memory (a memmap)."""
    paths = [images_dir / png_name(i) for i in range(num)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise RepaError(f"{len(missing)} of {num} samples are missing (first: {missing[0]}); "
                        "run the same command again to finish them")
    first = np.asarray(Image.open(paths[0]).convert("RGB"))
    tmp_npy = out.with_name(f".{out.stem}.arr_0.npy")
    arr = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.uint8, shape=(num, *first.shape))
    try:
        for i, p in enumerate(paths):
            img = np.asarray(Image.open(p).convert("RGB"))
            if img.shape != first.shape:
                raise RepaError(f"{p} is {img.shape[1]}x{img.shape[0]}, the others {first.shape[1]}x{first.shape[0]}")
            arr[i] = img
        arr.flush()
        save_npz(out, arr, labels)
    finally:
        del arr
        tmp_npy.unlink(missing_ok=True)
    return out


def make_grid(images: np.ndarray, pad: int = 2) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one near-square (rows x cols) image with white gaps."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, col = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[k]
    return grid


def npz_array_info(path: Path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an npz, read from its header only."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, _, dtype = _npy_header(f)
    return shape, dtype


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def iter_npz_batches(path: Path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Rows of one npz array in batches, streamed from the zip member (never all in memory)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, fortran, dtype = _npy_header(f)
        if fortran or dtype.hasobject:
            data = np.load(path)[key]
            for start in range(0, len(data), batch_size):
                yield np.ascontiguousarray(data[start:start + batch_size])
            return
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * row)
            if len(buf) != n * row:
                raise ValueError(f"{path}: '{key}' ends early (row {start + len(buf) // max(row, 1)} of {shape[0]})")
            yield np.frombuffer(bytearray(buf), dtype=dtype).reshape(n, *shape[1:])  # writable


# --------------------------------------------------------------------------------------------
# the sampling job


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
    # Read from the checkpoint (fixed by it, so not part of the identity):
    path: str = "linear"
    num_classes: int = 0
    step: int | None = None

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


def resolve_device(name: str) -> torch.device:
    """``auto``: cuda:LOCAL_RANK when CUDA is there, else the CPU; otherwise the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available")
    return device


def _previous_job(out: Path, job: _Job) -> dict[str, Any] | None:
    """The settings stored in ``out``; refuses a folder of other settings or of other files."""
    job_file = out / JOB_FILE
    if job_file.is_file():
        old = json.loads(job_file.read_text())
        mine = job.identity()
        changed = [k for k in IDENTITY_FIELDS if old.get(k) != mine[k]]
        if changed:
            details = "; ".join(f"{k}: {old.get(k)} -> {mine[k]}" for k in changed)
            raise UsageError(f"{out} holds samples made with other settings ({details}); use a new --out")
        return old
    if out.is_file():
        raise UsageError(f"output path {out} is a file, not a folder")
    if out.exists() and any(p.name != IMAGES_DIR and not p.name.startswith(".") for p in out.iterdir()):
        raise UsageError(f"output folder {out} is not empty and holds no {JOB_FILE}; use a new --out")
    return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def sample(
    ckpt: str | Path,
    out: str | Path,
    *,
    num: int = 50_000,
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 0.7),
    sampler: str = "sde",
    steps: int = 250,
    heun: bool = False,
    classes: Sequence[int] = (),
    seed: int = 0,
    batch_size: int = 64,
    cache: str | Path | None = None,
    vae: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    grid: int = 64,
    quiet: bool = False,
) -> SampleResult:
    """Sample ``num`` images from a checkpoint into ``out`` (resumable, torchrun-aware).

    Args:
        ckpt: a run folder (its newest EMA weights) or a checkpoint file (full or EMA-only).
        out: output folder (see the module docstring for its layout).
        num: number of samples, > 0. A rerun may raise it; the samples already made are kept.
        cfg_scale: classifier-free guidance scale (1: none).
        guidance_interval: ``(low, high)`` in t where guidance applies, within [0, 1].
        sampler: ``"sde"`` (Euler–Maruyama) or ``"ode"``.
        steps: model evaluations per sample.
        heun: Heun steps (ODE only).
        classes: class ids to cycle through; empty: a random class per sample from its seed.
        seed: job seed; sample ``i`` uses ``(seed, i)``.
        batch_size: samples per forward pass on each rank.
        cache: the training cache, if it moved from the path in the checkpoint's config.
        vae: a local copy of the cache's VAE (it must have the same weights).
        device: ``"auto"`` (cuda:LOCAL_RANK, else CPU), ``"cpu"``, ``"cuda"``...
        precision: ``"auto"`` (bf16 autocast on CUDA), ``"bf16"`` or ``"fp32"`` for the model;
            the VAE decodes in fp32.
        grid: number of samples in ``grid.png`` (0: no grid).
        quiet: no progress bar.

    Raises:
        UsageError: bad settings, an unknown checkpoint, or an ``out`` of other settings.
        CacheError: the training cache is missing or is not the one the model was trained on.
    """
    t0 = time.perf_counter()
    if num <= 0:
        raise UsageError(f"--num must be positive, got {num}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if grid < 0:
        raise UsageError(f"--grid must be >= 0, got {grid}")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'; known: {', '.join(PRECISIONS)}")
    if any(int(c) < 0 for c in classes):
        raise UsageError(f"--class takes class ids >= 0, got {list(classes)}")
    scfg = SamplerConfig(sampler=sampler, steps=steps, heun=heun, cfg_scale=cfg_scale,
                         guidance_interval=tuple(guidance_interval))  # type: ignore[arg-type]
    ckpt_path = resolve_checkpoint(ckpt).resolve()
    out = Path(out)
    rank, world = _dist_info()
    dev = resolve_device(device)

    job = _Job(str(ckpt_path), num, scfg.sampler, scfg.steps, scfg.heun, scfg.cfg_scale,
               list(scfg.guidance_interval), [int(c) for c in classes], int(seed), scfg.last_t)
    old = _previous_job(out, job)
    images = out / IMAGES_DIR
    present = {p.name for p in images.iterdir()} if images.is_dir() else set()
    mine = rank_indices(num, rank, world)
    todo = [i for i in mine if png_name(i) not in present]

    loaded: LoadedCheckpoint | None = None
    if todo or old is None:
        loaded = load_checkpoint_for_eval(ckpt_path, dev, cache)
        job.path, job.num_classes, job.step = loaded.path_type, loaded.model_config.num_classes, loaded.step
        bad = [c for c in job.classes if c >= job.num_classes]
        if bad:
            raise UsageError(f"--class {bad[0]} is not a class of this model (it has {job.num_classes})")
    else:
        job.path, job.num_classes, job.step = old["path"], old["num_classes"], old.get("step")
    if rank == 0:
        images.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / JOB_FILE, dataclasses.asdict(job))

    written = 0
    if todo:
        assert loaded is not None
        images.mkdir(parents=True, exist_ok=True)
        reader = open_training_cache(training_cache_path(loaded, cache), loaded.cache_info)
        decoder = load_decoder(reader, dev, vae)
        written = _sample_indices(loaded, decoder, dataclasses.replace(scfg, path=job.path), job, todo,
                                  images, batch_size, dev, precision, quiet or rank != 0)
    if world > 1:
        dist.barrier()
    npz = grid_path = None
    if rank == 0:
        labels = sample_labels(job.seed, range(num), job.num_classes, job.classes).numpy()
        npz = _assemble_if_stale(images, num, out / NPZ_NAME, labels)
        if grid:
            tiles = np.stack([np.asarray(Image.open(images / png_name(i)).convert("RGB"))
                              for i in range(min(grid, num))])
            grid_path = out / GRID_NAME
            Image.fromarray(make_grid(tiles)).save(grid_path)
    return SampleResult(out, num, written, len(mine) - len(todo), npz, grid_path, ckpt_path, job.step,
                        time.perf_counter() - t0, rank, world)


def _assemble_if_stale(images: Path, num: int, npz: Path, labels: np.ndarray) -> Path:
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


def _sample_indices(
    loaded: LoadedCheckpoint,
    decoder: LatentDecoder,
    scfg: SamplerConfig,
    job: _Job,
    todo: list[int],
    images: Path,
    batch_size: int,
    device: torch.device,
    precision: str,
    quiet: bool,
) -> int:
    """Sample, decode and write the PNGs of ``todo`` in batches; returns how many were written."""
    mcfg = loaded.model_config
    shape = (mcfg.in_channels, mcfg.input_size, mcfg.input_size)
    bar = tqdm(total=len(todo), unit="img", desc="sample", disable=quiet or not sys.stderr.isatty())
    written = 0
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        noise = SampleNoise(job.seed, idx, device)
        x1 = noise.randn(shape)  # (B, C, h, w) initial noise, first draw of each sample's stream
        y = sample_labels(job.seed, idx, mcfg.num_classes, job.classes).to(device)
        z = sample_latents(loaded.model, x1, y, scfg, loaded.null_class, noise, precision)
        pix = decoder(z, batch_size)  # (B, H, W, 3) uint8
        for i, img in zip(idx, pix):
            write_png(images / png_name(i), img)
        written += len(idx)
        bar.update(len(idx))
    bar.close()
    return written
