"""One checkpoint object per save: model, EMA, optimiser, step, config and the cache it was trained
on. Randomness needs no saved state: every step reseeds from ``(seed, rank, step)`` and the data
order is a function of ``(seed, step)``, so the global step is the whole data position."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_path(run: Path, step: int) -> Path:
    return run / CKPT_DIR / f"step-{step:08d}.pt"


def ema_path(run: Path, step: int) -> Path:
    return run / CKPT_DIR / f"ema-step-{step:08d}.pt"


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint in a run folder (temporary files are ignored)."""
    d = run / CKPT_DIR
    if not d.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)))
    return found[-1][1] if found else None


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, rename: a kill never leaves a half checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    run: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    cache_info: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write the full training state and an EMA-only weights file; prune older full checkpoints."""
    state = {
        "kind": "repa-train-checkpoint",
        "version": 1,
        "step": step,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": config,
        "cache": cache_info,
    }
    path = checkpoint_path(run, step)
    save_atomic(state, path)
    save_atomic({"kind": "repa-ema-weights", "version": 1, "step": step, "ema": ema.state_dict(), "config": config, "cache": cache_info}, ema_path(run, step))
    found = sorted(p for p in (run / CKPT_DIR).iterdir() if _NAME.match(p.name))
    for old in found[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)
