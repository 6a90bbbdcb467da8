"""Checkpoints: the one module that names, writes and reads them.

A run folder holds::

    RUN/checkpoints/step-00010000.pt          full training state: model, EMA, optimiser, step, card
    RUN/checkpoints/ema-step-00010000.pt      EMA weights and the card only (what inference reads)
    RUN/checkpoints/<file>.pt.sha256          the file's size and sha256, written after it

Every file carries a :class:`ModelCard`: everything inference needs without the training cache
(model shape, teachers in projector order, latent normalisation, the VAE's id, revision and
weights hash, class names, method and its options, interpolant, the method's sampling settings), plus the training config and
the fingerprints of the cache it was trained on. Files hold tensors and plain Python values only
and are read with ``torch.load(weights_only=True)``, so loading a file never runs code. Writes go
to a temporary file that is renamed into place, so a kill or a full disk never leaves a half
checkpoint under a checkpoint's name; the checksum record is written last, and a file is checked
against it before it is read (torch's zip reader does not notice a flipped bit in tensor data).
A resume skips a newest checkpoint that fails (or has no record: its save did not finish) and
falls back to the one before, saying so.

Randomness needs no saved state: every training step reseeds from ``(seed, rank, step)`` and the
data order is a function of ``(seed, step)``, so the global step is the whole data position.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import LatentNorm
from repa_cache.cache.identity import CacheIdentity
from repa_cache.cache.storage import atomic_file
from repa_cache.stages.weights import load_weights_file
from repa_cache.train.config import SamplingDefaults

log = logging.getLogger(__name__)

FORMAT = "repa-cache-checkpoint"
FORMAT_VERSION = 2
CKPT_DIR = "checkpoints"
KIND_TRAIN = "train"  # model, EMA, optimiser: what a resume needs
KIND_EMA = "ema"  # EMA weights only: what sampling and evaluation need
CHECKSUM_SUFFIX = ".sha256"
_NAME = re.compile(r"^(ema-)?step-(\d{8,})\.pt$")


@dataclass(frozen=True)
class ModelCard:
    """What a trained student is, self-contained for inference.

    Attributes:
        model: the resolved model config (``dataclasses.asdict`` of the model's config).
        teachers: teacher names in projector order (projector ``i`` aligns to ``teachers[i]``).
        latent_norm: the cache's latent normalisation (:class:`LatentNorm` as JSON).
        vae: ``{"id", "revision", "weights_sha256", "tiny"}`` of the VAE that encoded the latents.
        class_names: class name of each label index (the null class is ``len(class_names)``).
        method: ``{"name": ..., "options": {...}}``, the training objective.
        path: the interpolant (``"linear"`` or ``"cosine"``), which sampling must integrate.
        train: the run's training config (``TrainConfig.to_json()``).
        cache: the cache it was trained on (:class:`cache.identity.CacheIdentity` as JSON).
        sampling: the method's sampling settings (:class:`train.config.SamplingDefaults` as JSON),
            which ``repa sample`` uses where its command line sets none; empty in cards written
            before the record existed, which sample with REPA's settings as they always did.
    """

    model: dict[str, Any]
    teachers: tuple[str, ...]
    latent_norm: dict[str, Any]
    vae: dict[str, Any]
    class_names: tuple[str, ...]
    method: dict[str, Any]
    path: str = "linear"
    train: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def norm(self) -> LatentNorm:
        return LatentNorm.from_json(self.latent_norm)

    @property
    def trained_on(self) -> CacheIdentity:
        """The identity of the cache the run was trained on (:attr:`cache`, typed)."""
        return CacheIdentity.from_json(self.cache)

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        """The sampling settings the card records (REPA's when it records none)."""
        return SamplingDefaults.from_json(self.sampling) if self.sampling else SamplingDefaults()

    @property
    def cache_path(self) -> str | None:
        """Where the training cache was when the run started (it may have moved since)."""
        return self.train.get("cache")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["teachers"], d["class_names"] = list(self.teachers), list(self.class_names)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelCard:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["teachers"], kw["class_names"] = tuple(kw["teachers"]), tuple(kw["class_names"])
        return cls(**kw)


@dataclass
class Checkpoint:
    """One checkpoint file, read back: its kind, step, card and state dicts."""

    path: Path
    kind: str
    step: int
    card: ModelCard
    ema: dict[str, torch.Tensor]
    model: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None


# -- names ---------------------------------------------------------------------------------------
def checkpoint_path(run: Path, step: int) -> Path:
    return Path(run) / CKPT_DIR / f"step-{step:08d}.pt"


def ema_path(run: Path, step: int) -> Path:
    return Path(run) / CKPT_DIR / f"ema-step-{step:08d}.pt"


def _listing(run: Path) -> list[tuple[int, bool, Path]]:
    """(step, is EMA-only, path) of every checkpoint file in a run folder, oldest first."""
    folder = Path(run) / CKPT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(2)), bool(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def training_checkpoints(run: Path) -> list[Path]:
    """The full (resumable) checkpoints of a run, newest first."""
    return [p for _, ema, p in reversed(_listing(run)) if not ema]


def latest_checkpoint(run: Path) -> Path | None:
    """The newest full checkpoint of a run folder whose save finished (it has its checksum
    record), or None."""
    found = [p for p in training_checkpoints(run) if checksum_path(p).is_file()]
    return found[0] if found else None


def resolve_checkpoint(ckpt: str | Path) -> Path:
    """The file named by ``ckpt``: a checkpoint file, or a run folder's newest weights (at equal
    steps the EMA-only file, which is smaller)."""
    path = Path(ckpt)
    if path.is_file():
        return path
    if not path.exists():
        raise UsageError(f"no checkpoint or run folder at {path}")
    found = _listing(path)
    if not found:
        raise UsageError(f"{path} holds no checkpoint (expected {CKPT_DIR}/ema-step-*.pt or step-*.pt)")
    return max(found)[2]


# -- writing -------------------------------------------------------------------------------------
def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def _save(obj: dict[str, Any], path: Path) -> None:
    """The file, then its checksum record (a file without a record is an unfinished save)."""
    checksum_path(path).unlink(missing_ok=True)
    with atomic_file(path) as f:
        torch.save(obj, f)
    with atomic_file(checksum_path(path)) as f:  # read back from the page cache, not the disk
        f.write(json.dumps(_file_digest(path)).encode())


def _header(kind: str, step: int, card: ModelCard) -> dict[str, Any]:
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "step": int(step), "card": card.to_json()}


def save_checkpoint(
    run: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    card: ModelCard,
    keep: int = 2,
) -> Path:
    """Write the full training state and an EMA-only file; keep the newest ``keep`` full ones
    (EMA-only files are small and all kept)."""
    path = checkpoint_path(run, step)
    full = _header(KIND_TRAIN, step, card)
    full.update(model=model.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict())
    _save(full, path)
    _save({**_header(KIND_EMA, step, card), "ema": ema.state_dict()}, ema_path(run, step))
    if keep > 0:
        for old in training_checkpoints(run)[keep:]:
            old.unlink(missing_ok=True)
            checksum_path(old).unlink(missing_ok=True)
    return path


def save_state_dicts(
    run: Path,
    step: int,
    card: ModelCard,
    ema: dict[str, torch.Tensor],
    model: dict[str, torch.Tensor] | None = None,
    optimizer: dict[str, Any] | None = None,
) -> Path:
    """Write weights that exist only as state dicts (imported ones): always the EMA-only file, and
    the full file too when both ``model`` and ``optimizer`` are given. Returns the EMA-only path."""
    if model is not None and optimizer is not None:
        _save({**_header(KIND_TRAIN, step, card), "model": model, "ema": ema, "optimizer": optimizer},
              checkpoint_path(run, step))
    path = ema_path(run, step)
    _save({**_header(KIND_EMA, step, card), "ema": ema}, path)
    return path


# -- reading -------------------------------------------------------------------------------------
def check_file(path: Path, required: bool = True) -> None:
    """Compare a checkpoint file with its checksum record. Without a record: refused when
    ``required`` (a resume: the save did not finish), else a warning (a file copied on its own)."""
    record = checksum_path(path)
    if not record.is_file():
        if required:
            raise UsageError(f"{path} has no checksum record {record.name} (its save did not finish)")
        log.warning("%s has no checksum record %s; loading it unchecked", path, record.name)
        return
    try:
        want = json.loads(record.read_bytes()[:4096])
        expected = (int(want["bytes"]), str(want["sha256"]))
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{record} is not a checksum record of this tool") from None
    size = path.stat().st_size
    if size != expected[0]:
        raise UsageError(f"{path} has {size} bytes, {expected[0]} were written (truncated or replaced)")
    if _file_digest(path)["sha256"] != expected[1]:
        raise UsageError(f"{path} fails its checksum (the file is damaged)")


def load_checkpoint(path: str | Path, kinds: tuple[str, ...] = (KIND_TRAIN, KIND_EMA), checksum_required: bool = False) -> Checkpoint:
    """Read one checkpoint file (never running code from it), checked against its checksum record.

    Raises:
        UsageError: one line naming the file when it fails its checksum, is not a readable
            checkpoint of this tool, has a format version this version does not know, or is not of
            the ``kinds`` asked for.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no checkpoint file at {path}")
    check_file(path, required=checksum_required)
    try:
        state = load_weights_file(path)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt, foreign or code-carrying: all refused
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UsageError(f"{path} is not a readable checkpoint of this tool ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        kind = state.get("kind") if isinstance(state, dict) else None
        hint = " (written by an older version of this tool)" if kind in ("repa-train-checkpoint", "repa-ema-weights") else ""
        raise UsageError(f"{path} is not a checkpoint of this tool{hint}")
    version = state.get("version")
    if version != FORMAT_VERSION:
        raise UsageError(f"{path} has checkpoint format version {version!r}; this version reads version {FORMAT_VERSION}")
    if state.get("kind") not in kinds:
        raise UsageError(f"{path} is a '{state.get('kind')}' checkpoint; expected {' or '.join(repr(k) for k in kinds)}")
    try:
        card = ModelCard.from_json(state["card"])
        return Checkpoint(path, state["kind"], int(state["step"]), card, state["ema"], state.get("model"), state.get("optimizer"))
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path} is a damaged checkpoint (missing or malformed {e})") from None


def load_latest_training(run: Path) -> Checkpoint | None:
    """The newest full checkpoint of a run that loads. A newer one that does not (truncated,
    corrupted) is skipped with a warning naming it; so is one whose save did not finish (no
    checksum record: the run was killed while writing it). None when no checkpoint was finished;
    a UsageError when finished ones exist but none of them loads."""
    paths = training_checkpoints(run)
    damaged = False
    for i, path in enumerate(paths):
        try:
            return load_checkpoint(path, kinds=(KIND_TRAIN,), checksum_required=True)
        except UsageError as e:
            damaged = damaged or checksum_path(path).is_file()
            older = paths[i + 1].name if i + 1 < len(paths) else None
            log.warning("%s%s", e, f"; falling back to {older}" if older else "")
    if damaged:
        raise UsageError(f"no checkpoint of {run} can be read (newest: {paths[0].name}); use a new --out or remove them")
    return None


def strip_wrapper_prefixes(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes, if any."""
    out = {}
    for key, value in weights.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out
