"""Batches for the trainer, streamed from a committed cache.

Data order is a pure function of ``(seed, epoch, global position)``:

* the valid cache indices are cut into contiguous blocks of ``block_size`` samples (the cache order
  is already a random permutation, so a block is class-mixed), the block order is permuted per
  epoch, and samples are shuffled within windows of ``window_blocks`` blocks;
* global batch ``b`` of an epoch is positions ``[b*G, (b+1)*G)`` of that order (an incomplete last
  batch is dropped), and rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal slices of it — every
  rank gets the same number of batches by construction, and resume needs only the global step;
* the stored view of each sample (original or flipped) is drawn from the same seed; latent and
  features always come from the same view.

Which teacher arrays a step reads depends on the step: ``DataConfig.teacher_fields`` lists
``(first step, fields)`` phases (the training method's fields while it aligns, and what it still
reads once an alignment schedule has switched the alignment off: for REPA nothing, so the step
reads latents only).

A batch item is a dict of CPU tensors; :func:`to_device` turns it into the model's inputs on the
device (posterior sample ``mean + std·ε``, normalised with the cache's :class:`LatentNorm`). Teacher
tokens travel as stored: float16, or for a quantised group (``--feature-codec int8``) the int8
values and their per-token scales, which are dequantised on the device (half the host-to-device
bytes, and no decode work in the loader).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from repa_cache.cache.codec import Int8Codec, dequantize, scale_name
from repa_cache.cache.errors import UsageError
from repa_cache.cache.format import LATENTS, LatentNorm, teacher_group
from repa_cache.cache.open import open_reader
from repa_cache.cache.reader import ReaderBase
from repa_cache.train.methods.base import TEACHER_ARRAYS, StepBatch


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from and in which order."""

    cache: str
    teachers: tuple[str, ...]
    global_batch: int = 256
    seed: int = 0
    block_size: int = 64  # contiguous cache samples read together
    window_blocks: int = 32  # samples are shuffled across this many blocks
    num_workers: int = 2
    prefetch_factor: int = 2
    verify_checksums: bool = True  # hash each shard the first time this process reads it (refuses damaged data)
    holdout: int = 0  # the last N valid cache samples are never trained on (alignment metrics use them)
    # (first step, arrays read from each teacher group) in step order; REPA reads the patch tokens
    teacher_fields: tuple[tuple[int, tuple[str, ...]], ...] = ((0, ("patch",)),)

    def fields_at(self, step: int) -> tuple[str, ...]:
        """The teacher arrays read for global step ``step``."""
        fields: tuple[str, ...] = ()
        for first, names in self.teacher_fields:
            if step >= first:
                fields = names
        return fields


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


def epoch_order(valid: np.ndarray, seed: int, epoch: int, block_size: int, window_blocks: int) -> np.ndarray:
    """All valid cache indices in the order of one epoch (a pure function of its arguments)."""
    blocks = [valid[i : i + block_size] for i in range(0, len(valid), block_size)]
    rng = _rng(seed, epoch, 0)
    perm = rng.permutation(len(blocks))
    order = []
    for w in range(0, len(perm), window_blocks):
        window = np.concatenate([blocks[b] for b in perm[w : w + window_blocks]])
        order.append(window[_rng(seed, epoch, 1, w).permutation(len(window))])
    return np.concatenate(order) if order else np.empty(0, dtype=np.int64)


class CacheBatches(Dataset):
    """Map-style dataset: item ``step`` is this rank's slice of global batch ``step``.

    Each DataLoader worker opens its own reader (readers are stateless on disk).
    """

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> None:
        if cfg.global_batch % world_size:
            raise UsageError(f"--batch-size {cfg.global_batch} is not divisible by the world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.groups = [LATENTS] + [teacher_group(t) for t in cfg.teachers]
        reader = self._open()
        valid = reader.valid_indices()
        if not 0 <= cfg.holdout < len(valid):
            raise UsageError(f"--holdout {cfg.holdout} must leave samples to train on (the cache has {len(valid)} usable samples)")
        self.valid = valid[: len(valid) - cfg.holdout]
        self.num_views = len(reader.views)
        #: the feature codec of each teacher's group (None: stored as floats), for to_device
        self.codecs = {t: reader.feature_codec(g) for t, g in zip(cfg.teachers, self.groups[1:])}
        self.batches_per_epoch = len(self.valid) // cfg.global_batch
        if self.batches_per_epoch == 0:
            raise UsageError(
                f"the cache has {len(self.valid)} usable samples, fewer than one batch of {cfg.global_batch}; lower --batch-size"
            )
        self._reader: ReaderBase | None = reader
        self._orders: dict[int, np.ndarray] = {}

    def _open(self) -> ReaderBase:
        return open_reader(self.cfg.cache, groups=self.groups, verify_checksums=self.cfg.verify_checksums)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # each worker process opens its own
        return state

    def fields(self, step: int) -> list[str]:
        """What step ``step`` reads: the posterior's moments and the method's teacher arrays."""
        names = self.cfg.fields_at(step)
        return [f"{LATENTS}/mean", f"{LATENTS}/std"] + [f"{g}/{n}" for g in self.groups[1:] for n in names]

    @property
    def local_batch(self) -> int:
        return self.cfg.global_batch // self.world_size

    def _order(self, epoch: int) -> np.ndarray:
        """All valid indices in epoch order; the last two epochs are kept (a batch may span two)."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = epoch_order(self.valid, self.cfg.seed, epoch, self.cfg.block_size, self.cfg.window_blocks)
        return self._orders[epoch]

    def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(cache indices, view per sample) of this rank's part of global batch ``step``."""
        epoch, b = divmod(step, self.batches_per_epoch)
        G, L = self.cfg.global_batch, self.local_batch
        glob = self._order(epoch)[b * G : (b + 1) * G]
        views = _rng(self.cfg.seed, epoch, 2, b).integers(0, self.num_views, size=G)
        sl = slice(self.rank * L, (self.rank + 1) * L)
        return glob[sl], views[sl]

    def __len__(self) -> int:  # effectively unbounded; the trainer stops at max_steps
        return 2**62

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        if self._reader is None:
            self._reader = self._open()
        idx, views = self.indices(step)
        data = self._reader.read_views(idx, views, fields=self.fields(step), raw=True)  # only the drawn view, as stored
        # under the cache's own names: "latents/mean" (B, C, h, w), "teachers/<t>/patch" (B, T, D) float16
        # or int8 with "teachers/<t>/patch_scale" (B, T, 1), ..., "label"
        out = {k: torch.from_numpy(v) for k, v in data.items()}
        out.update(index=torch.from_numpy(idx), view=torch.from_numpy(views), step=torch.tensor(step))
        return out


class StepSampler(torch.utils.data.Sampler[int]):
    """Yields global steps ``start, start+1, ...`` up to ``stop``."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def make_loader(ds: CacheBatches, start_step: int, stop_step: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over global steps; one item = one local batch, prefetched by workers."""
    workers = ds.cfg.num_workers
    return DataLoader(
        ds,
        batch_size=None,
        sampler=StepSampler(start_step, stop_step),
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=ds.cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=False,
    )


def to_device(batch: dict[str, torch.Tensor], norm: LatentNorm, teachers: tuple[str, ...], device: torch.device,
              codecs: dict[str, Int8Codec | None] | None = None) -> StepBatch:
    """The step's inputs on the device: x is a fresh posterior sample in the model's space; the
    teacher tokens the batch holds (patch tokens, CLS tokens, hidden tokens) in float32, in teacher order,
    dequantised on the device with each teacher's codec (``CacheBatches.codecs``; None: floats)."""
    mean = batch[f"{LATENTS}/mean"].to(device, non_blocking=True)
    std = batch[f"{LATENTS}/std"].to(device, non_blocking=True)
    x = norm.to_model(mean + std * torch.randn_like(mean))  # (B, C, h, w)
    y = batch["label"].to(device, non_blocking=True)
    codecs = codecs or {}

    def tokens(name: str) -> list[torch.Tensor]:
        out = []
        for t in teachers:
            key = f"{teacher_group(t)}/{name}"
            if key not in batch:
                continue
            q = batch[key].to(device, non_blocking=True)
            scale = batch.get(f"{teacher_group(t)}/{scale_name(name)}")
            codec = codecs.get(t)
            if codec is not None and name in codec.arrays and scale is None:
                raise ValueError(f"teacher '{t}' is quantised but the batch has no {name} scales")
            out.append(dequantize(q, scale.to(device, non_blocking=True), codec) if scale is not None else q.float())
        return out

    return StepBatch(x, y, **{name: tokens(name) for name in TEACHER_ARRAYS})  # float32: (B, T, D) patch, (B, D) cls, ...
