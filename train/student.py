"""The student a checkpoint holds, rebuilt from its model card alone: its shape
(:func:`card_config`), its method and its EMA (or raw) weights (:func:`load_student`). Sampling,
``repa align``, ``--init-from`` and the checkpoint converters all read a student this way."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from repa_cache.cache.errors import UsageError
from repa_cache.train.checkpoint import Checkpoint, ModelCard, latest_checkpoint, load_checkpoint, resolve_checkpoint, strip_wrapper_prefixes
from repa_cache.train.methods import Method, method_from_card
from repa_cache.train.model import SiT, SiTConfig

logger = logging.getLogger(__name__)


def card_config(card: ModelCard, path: str | Path) -> SiTConfig:
    """The model shape a card records (UsageError naming ``path`` when it is not one)."""
    try:
        return SiTConfig(**card.model)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{path} has an unusable model config ({str(e).splitlines()[0]})") from None


@dataclass
class LoadedModel:
    """The student of a checkpoint with its EMA weights, and the card it came with.

    Attributes:
        model: the SiT in eval mode with gradients off, on the requested device.
        config: its shape (``SiTConfig(**card.model)``).
        method: the training method the card names (its student and what sampling integrates).
        card: the checkpoint's model card (teachers, latent normalisation, VAE, interpolant...).
        step: training step of the weights.
        path: the checkpoint file that was read.
    """

    model: SiT
    config: SiTConfig
    card: ModelCard
    step: int
    path: Path
    method: Method

    @property
    def null_class(self) -> int:
        """Label of the unconditional model (the number of real classes)."""
        return self.config.num_classes


def weights_file(ckpt: str | Path, weights: str = "ema") -> Path:
    """The checkpoint file ``ckpt`` names for ``weights``: a file as given; in a run folder the
    newest weights, and for the raw weights its newest full checkpoint (EMA-only files lack them)."""
    if weights == "raw" and Path(ckpt).is_dir():
        full = latest_checkpoint(Path(ckpt))
        if full is not None:
            return full
    return resolve_checkpoint(ckpt)


def load_student(ckpt: str | Path | Checkpoint, device: torch.device | str = "cpu", weights: str = "ema") -> LoadedModel:
    """Rebuild the student of a checkpoint (file or run folder, or a checkpoint already read) from
    its model card alone, with its EMA weights (``weights="raw"``: the trained weights themselves).

    Raises:
        UsageError: no such file, not a checkpoint of this tool, an unknown format version, or
            weights that do not fit the card's model shape.
    """
    ckpt_file = ckpt if isinstance(ckpt, Checkpoint) else load_checkpoint(weights_file(ckpt, weights))
    config = card_config(ckpt_file.card, ckpt_file.path)
    method = method_from_card(ckpt_file.card.method)
    model = method.build_student(config)
    state = ckpt_file.ema if weights == "ema" else ckpt_file.model
    kind = "EMA" if weights == "ema" else "raw"
    if state is None:
        raise UsageError(f"{ckpt_file.path} holds no raw weights (only the EMA ones); use --weights ema")
    try:
        model.load_state_dict(strip_wrapper_prefixes(state))
    except RuntimeError as e:
        raise UsageError(f"the {kind} weights in {ckpt_file.path} do not fit {config}: {str(e).splitlines()[0]}") from None
    model = model.to(device).eval().requires_grad_(False)
    logger.info("loaded %s (step %d, %s weights) on %s", ckpt_file.path, ckpt_file.step, kind, device)
    return LoadedModel(model, config, ckpt_file.card, ckpt_file.step, ckpt_file.path, method)
