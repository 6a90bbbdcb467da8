"""Transport between data and noise: interpolant path, time sampling, velocity target, loss.

Everything about alpha(t) and sigma(t) lives here: the training step calls
:meth:`Transport.training_losses` and adds the REPA term, and the samplers call
:func:`path_coefficients`.

Convention (SiT/REPA): ``x_t = alpha(t) * x + sigma(t) * eps`` with t=0 data and t=1 noise.
The model predicts the velocity ``v = d/dt x_t = alpha'(t) * x + sigma'(t) * eps``; on the linear
path ``v = eps - x``.

All randomness comes from torch's global RNG (``torch.rand``, ``torch.randn_like``) in a fixed order
per call (times, then noise, then label dropout), so a trainer that saves and restores the RNG
state resumes bit-exactly.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Protocol

import torch
from torch import Tensor

from repa_cache.cache.errors import UsageError
from repa_cache.train.config import PATHS, TransportConfig

logger = logging.getLogger(__name__)


class VelocityModel(Protocol):
    """What the transport needs from a model: ``model(x_t, t, y) -> (v_hat, zs)``."""

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]: ...


def path_coefficients(path: str, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(alpha, sigma, d_alpha/dt, d_sigma/dt)`` of an interpolant at times t, each shaped like t.

    The one definition of the paths, used by training and by the samplers: ``"linear"``
    (alpha = 1 - t, sigma = t) and ``"cosine"`` (alpha = cos(pi t / 2), sigma = sin(pi t / 2)).
    """
    if path == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path != "cosine":
        raise UsageError(f"unknown path '{path}'; known paths: {', '.join(PATHS)}")
    half_pi = math.pi / 2
    alpha, sigma = torch.cos(half_pi * t), torch.sin(half_pi * t)
    return alpha, sigma, -half_pi * sigma, half_pi * alpha


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts over a (B, C, H, W) tensor."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)


class Transport:
    """The interpolant path and the flow-matching loss of SiT, as used by REPA."""

    def __init__(self, config: TransportConfig | None = None) -> None:
        self.config = config if config is not None else TransportConfig()
        self.config.validate()

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha, sigma, d_alpha/dt, d_sigma/dt)`` at times t, each shaped like t."""
        return path_coefficients(self.config.path, t)

    def sample_t(self, batch: int, device: torch.device | str) -> Tensor:
        """Training times (B,) in [0, 1), float32, from the global RNG."""
        if self.config.time_sampling == "uniform":
            return torch.rand(batch, device=device)
        # s = exp(n), t = s / (1 + s) = sigmoid(n): median 0.5, mass away from the ends.
        return torch.sigmoid(torch.randn(batch, device=device))

    def interpolate(self, x: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_t, v_target)`` for data x and noise of shape (B, C, H, W) and times t (B,)."""
        alpha, sigma, d_alpha, d_sigma = (_per_sample(a, x) for a in self.alpha_sigma(t))
        x_t = alpha * x + sigma * noise
        v = d_alpha * x + d_sigma * noise
        return x_t, v

    def drop_labels(self, y: Tensor) -> Tensor:
        """Replace each label by the null class with probability ``label_dropout``.

        Applied exactly once per step, here; the model itself never drops labels.
        """
        p = self.config.label_dropout
        if p <= 0:
            return y
        drop = torch.rand(y.shape[0], device=y.device) < p  # (B,)
        return torch.where(drop, torch.full_like(y, self.config.null_class), y)

    def training_losses(self, model: VelocityModel, x: Tensor, y: Tensor) -> dict[str, Any]:
        """One flow-matching step's loss on clean latents x (B, C, H, W) with labels y (B,).

        Returns a dict with ``"denoise"`` (scalar ``mean((v_hat - v)^2)`` in fp32), ``"zs"`` (the
        model's projected tokens, for the REPA loss), ``"t"`` (B,) and ``"y_used"`` (the labels
        after dropout, the ones the model saw).
        """
        t = self.sample_t(x.shape[0], x.device)  # (B,)
        noise = torch.randn_like(x)  # (B, C, H, W)
        x_t, v = self.interpolate(x, noise, t)
        y_used = self.drop_labels(y)
        v_hat, zs = model(x_t, t, y_used)
        denoise = (v_hat.float() - v.float()).pow(2).mean()
        return {"denoise": denoise, "zs": zs, "t": t, "y_used": y_used}

