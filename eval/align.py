"""``repa align``: how well a checkpoint's student agrees with its teachers on cached features.

The measures (mean cosine, CKNNA, mutual kNN) live in :mod:`repa_cache.train.alignment`, which the
trainer also logs; this is the job that runs them for a checkpoint. The model, its teachers (in
projector order), its interpolant and latent normalisation come from the checkpoint's model card;
the latents and teacher features from a cache: the training cache named in the card, or another
path to it (``--cache``). Either way each group read must have the fingerprint the model was
trained on. Note that the trainer reads every valid index not held out (``--holdout``), so the
measured slice (the last ``num`` valid indices) is held out only if the run was trained that way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from repa_cache.cache.errors import CacheError, UsageError
from repa_cache.cache.format import LATENTS, teacher_group
from repa_cache.cache.identity import CacheIdentity
from repa_cache.cache.open import open_reader
from repa_cache.cache.progress import Progress
from repa_cache.cache.reader import ReaderBase
from repa_cache.cache.storage import store_path
from repa_cache.eval.config import AlignConfig
from repa_cache.eval.sample import local_rank
from repa_cache.stages.devices import resolve_device
from repa_cache.train.alignment import alignment_metrics
from repa_cache.train.student import LoadedModel, load_student

logger = logging.getLogger(__name__)

MEASURES = ("cos", "cknna", "cknna_proj", "mutual_knn")


def open_training_cache(cache: str | Path, trained_on: CacheIdentity, groups: Sequence[str]) -> ReaderBase:
    """Open ``groups`` of a cache (or its webdataset export), refusing any group whose fingerprint
    differs from the one recorded when the model was trained (``card.trained_on``).

    Raises:
        CacheError: a missing or uncommitted cache or group, or a group with another fingerprint.
    """
    reader = open_reader(cache, groups=list(groups))
    trained_on.check(reader, "pass the training cache with --cache")
    return reader


def _cache_of(loaded: LoadedModel, cache: str | None) -> str:
    """The cache to read: ``cache`` if given, else the training cache named in the card."""
    path = cache if cache is not None else loaded.card.cache_path
    if not path:
        raise UsageError(f"{loaded.path} does not name its training cache; pass --cache")
    if not store_path(path).exists():
        raise CacheError(f"the training cache {path} of {loaded.path} is missing; pass --cache")
    return str(path)


def align(ckpt: str | Path, cfg: AlignConfig | None = None, quiet: bool = False) -> dict[str, Any]:
    """Alignment metrics of a checkpoint's EMA student on the last ``cfg.num`` valid cache samples.

    Args:
        ckpt: a run folder or a checkpoint file.
        cfg: the measurement's settings (default: :class:`AlignConfig`'s).
        quiet: no progress bar or status lines.

    Returns:
        ``{"checkpoint", "step", "cache", "num", "t", "k", "teachers": {name: {"cos", "cknna",
        "cknna_proj", "mutual_knn"}}}``.

    Raises:
        UsageError: bad settings or checkpoint. CacheError: a missing cache or one with other
            fingerprints than the training cache.
    """
    cfg = cfg if cfg is not None else AlignConfig()
    if cfg.num <= 0:
        raise UsageError(f"--num must be positive, got {cfg.num}")
    loaded = load_student(ckpt, resolve_device(cfg.device, local_rank()), cfg.weights)
    card = loaded.card
    groups = [LATENTS] + [teacher_group(n) for n in card.teachers]
    try:
        reader = open_training_cache(_cache_of(loaded, cfg.cache), card.trained_on, groups)
    except CacheError as e:
        raise CacheError(f"{e} (needed for alignment with {', '.join(card.teachers)})") from e
    # Progress counts the samples as the student sees them: a hook on its forward pass.
    bar = Progress(min(cfg.num, len(reader.valid_indices())), "align", "samples", quiet=quiet)
    hook = loaded.model.register_forward_hook(lambda _m, args, _out: bar.update(int(args[0].shape[0])))
    try:
        metrics = alignment_metrics(loaded.model, reader, card.teachers, num=cfg.num, t=cfg.t, k=cfg.k,
                                    batch_size=cfg.batch_size, seed=cfg.seed, path=card.path,
                                    resample=bool(card.train.get("resample_teacher")), precision=cfg.precision,
                                    norm=card.norm, method=loaded.method)
    finally:
        hook.remove()
    bar.close()
    per_teacher = {name: {m: metrics[f"align/{m}/{name}"] for m in MEASURES} for name in card.teachers}
    return {"checkpoint": str(loaded.path), "step": loaded.step, "cache": str(reader.root),
            "num": int(metrics["align/num"]), "t": cfg.t, "k": cfg.k, "weights": cfg.weights, "teachers": per_teacher}
