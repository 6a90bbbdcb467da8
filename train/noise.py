"""Per-sample seeded noise: each sample draws from its own generator, seeded from ``(seed, index)``.

A sample's noise then depends neither on the batch it is in, nor on the batch size, nor on how a
job is split across ranks. The alignment metrics (:mod:`repa_cache.train.alignment`) and the
samplers (:mod:`repa_cache.eval.samplers`) both draw their noise here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed for one stream of sample ``index`` of a job seeded ``seed``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index), int(stream)])
    return int(state.generate_state(1, np.uint64)[0] >> np.uint64(1))


class SampleNoise:
    """Gaussian noise for a batch of samples, each drawn from its own generator.

    Generators live on the CPU (the draws are identical whatever the device) and are seeded with
    :func:`sample_seed` ``(seed, index)``. Successive calls continue each sample's stream: for
    sampling, the first call gives the initial noise and the following ones the SDE increments.
    """

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.indices = [int(i) for i in indices]
        self.device = torch.device(device)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def randn(self, shape: Sequence[int], repeat: int = 1) -> Tensor:
        """(B, *shape) float64 standard normals on the device; ``repeat`` tiles the batch."""
        draws = [torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in self.generators]
        z = torch.stack(draws).to(self.device, torch.float64)  # (B, *shape)
        return z.repeat(repeat, *([1] * len(shape))) if repeat > 1 else z
