"""Dataset latent statistics: the per-channel mean and std of the stored posterior means over a
whole cache (every valid sample, every view), as the f16 recipes normalise their latents
(REPA-E's ``latents_bias`` / ``latents_scale``, LightningDiT's ``latents_stats.pt``).

They are computed in one pass over the latents group, shard by shard, with exact float64
accumulators merged per block (Chan et al.'s pairwise update of mean and sum of squared
deviations), and stored next to the group's commit record as ``_stats/latents.json``: the values,
the number of samples and values they cover, the sha256 of the cache indices they cover, the
fingerprint of the latents group they were computed from, and a sha256 of the record itself.
``repa train --latent-norm dataset`` normalises with them: ``z = (x - mean) / std``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from repa_cache.cache.errors import CacheError, UsageError
from repa_cache.cache.format import LATENTS, LatentNorm, read_json, write_json_atomic
from repa_cache.cache.progress import Progress
from repa_cache.cache.reader import CacheReader
from repa_cache.cache.storage import StorePath

STATS_DIR = "_stats"
#: The same record in a webdataset export (a flat folder: shards, index, manifest).
EXPORT_STATS_FILE = "latent-stats.json"
KIND = "latent-stats"
VERSION = 1


def stats_path(root: StorePath) -> StorePath:
    """Where a cache keeps its latent statistics; a webdataset export keeps them as
    :data:`EXPORT_STATS_FILE` (read from there when present)."""
    exported = root / EXPORT_STATS_FILE
    return exported if exported.exists() else root / STATS_DIR / f"{LATENTS}.json"


def carry_latent_stats(src: StorePath, dst: StorePath, fingerprint: str) -> str | None:
    """Copy ``src``'s statistics to ``dst`` (a cache folder, or an export's file) when the latents
    with ``fingerprint`` travel with them: what happened, or None when ``src`` has none. Damaged
    statistics, or statistics of other latents, stay behind (a run would refuse them anyway); a
    destination that has its own is left as it is."""
    if not stats_path(src).exists():
        return None
    try:
        stats = read_latent_stats(src, fingerprint)
    except UsageError:
        return "not copied (damaged or of other latents; compute them again with repa latent-stats)"
    assert stats is not None
    if dst.exists() and read_json(dst) == stats.to_json():
        return "already there"
    if dst.exists():
        return "kept the destination's own"
    write_json_atomic(dst, stats.to_json())
    return "copied"


def indices_sha256(indices: np.ndarray) -> str:
    """The identity of a set of cache indices (ascending int64)."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class LatentStats:
    """Per-channel mean and std of the posterior means of a cache's latents."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    samples: int  # cache samples covered (valid indices)
    values: int  # values per channel (samples x views x h x w)
    indices_sha256: str  # of the cache indices covered
    latents_fingerprint: str  # of the latents group they were computed from

    @property
    def norm(self) -> LatentNorm:
        """The normalisation ``z = (x - mean) / std``."""
        return LatentNorm(tuple(1.0 / s for s in self.std), self.mean)

    def to_json(self) -> dict[str, Any]:
        body = {"kind": KIND, "version": VERSION, "mean": list(self.mean), "std": list(self.std), "samples": self.samples,
                "values": self.values, "indices_sha256": self.indices_sha256, "latents_fingerprint": self.latents_fingerprint}
        return body | {"sha256": _digest(body)}

    @classmethod
    def from_json(cls, d: Any, where: str) -> LatentStats:
        """A stored record, checked (UsageError naming ``where`` for anything out of place)."""
        try:
            body = {k: v for k, v in d.items() if k != "sha256"}
            if d.get("kind") != KIND or d.get("version") != VERSION:
                raise ValueError(f"not a version {VERSION} latent statistics record")
            if d.get("sha256") != _digest(body):
                raise ValueError("its checksum does not match its content")
            mean, std = [float(v) for v in d["mean"]], [float(v) for v in d["std"]]
            if not mean or len(mean) != len(std) or len(mean) > 4096:
                raise ValueError("mean and std must be lists of one value per channel")
            if not all(np.isfinite(mean)) or not all(np.isfinite(s) and s > 0 for s in std):
                raise ValueError("mean must be finite and std positive")
            return cls(tuple(mean), tuple(std), int(d["samples"]), int(d["values"]), str(d["indices_sha256"]),
                       str(d["latents_fingerprint"]))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{where}: unusable latent statistics ({e}); compute them again with repa latent-stats") from None


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _Moments:
    """Per-channel count, mean and sum of squared deviations in float64, merged block by block."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.mean = np.zeros(channels, np.float64)
        self.m2 = np.zeros(channels, np.float64)

    def add(self, x: np.ndarray) -> None:
        """``x`` (n, V, C, h, w): every value of each channel."""
        per_channel = np.moveaxis(x, 2, 0).reshape(x.shape[2], -1).astype(np.float64)  # (C, n V h w)
        nb = per_channel.shape[1]
        if nb == 0:
            return
        mb = per_channel.mean(axis=1)
        m2b = ((per_channel - mb[:, None]) ** 2).sum(axis=1)
        total = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / total)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / total)
        self.n = total


def compute_latent_stats(root: str | StorePath, quiet: bool = False) -> LatentStats:
    """The statistics of a committed cache's latents, one shard at a time (memory: one shard)."""
    reader = CacheReader(root, groups=[LATENTS])
    meta = reader.meta
    channels = int(reader.group(LATENTS).meta.model["latent_channels"])
    moments = _Moments(channels)
    with Progress(meta.num_shards, "latent stats", "shards", quiet=quiet) as bar:
        for shard in range(meta.num_shards):
            start, stop = meta.shard_range(shard)
            moments.add(reader.read_block(start, stop, fields=[f"{LATENTS}/mean"])[f"{LATENTS}/mean"])
            bar.update(1)
    if moments.n == 0:
        raise CacheError(f"{reader.root} holds no valid samples to compute latent statistics over")
    std = np.sqrt(moments.m2 / moments.n)  # population std, as numpy's default
    valid = reader.valid_indices()
    return LatentStats(tuple(float(v) for v in moments.mean), tuple(float(v) for v in std), int(valid.size), moments.n,
                       indices_sha256(valid), reader.group(LATENTS).commit["fingerprint_hash"])


def write_latent_stats(root: StorePath, stats: LatentStats) -> StorePath:
    path = stats_path(root)
    write_json_atomic(path, stats.to_json())
    return path


def read_latent_stats(root: StorePath, fingerprint: str) -> LatentStats | None:
    """The stored statistics of a cache, checked against its latents group's ``fingerprint``
    (None when there are none; UsageError when they belong to other latents or are damaged)."""
    path = stats_path(root)
    if not path.exists():
        return None
    try:
        raw = read_json(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable latent statistics ({e}); compute them again with repa latent-stats") from None
    stats = LatentStats.from_json(raw, str(path))
    if stats.latents_fingerprint != fingerprint:
        raise UsageError(f"{path} was computed from other latents than the cache holds; compute them again with repa latent-stats")
    return stats


def describe_latent_stats(stats: LatentStats) -> list[str]:
    """Lines for ``repa stats`` and ``repa latent-stats``."""
    def row(values: tuple[float, ...]) -> str:
        shown = ", ".join(f"{v:.4f}" for v in values[:8])
        return shown + (f", ... ({len(values)} channels)" if len(values) > 8 else "")

    return [f"latent stats   over {stats.samples} samples ({stats.values} values per channel), z = (x - mean) / std",
            f"  mean         {row(stats.mean)}",
            f"  std          {row(stats.std)}"]
