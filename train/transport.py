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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from repa_cache.cache.errors import UsageError
from repa_cache.train.config import PATHS, TransportConfig

logger = logging.getLogger(__name__)


class VelocityModel(Protocol):
    """What the transport needs from a model: ``model(x_t, t, y, *extras_t, align=...) ->
    (v_hat, zs, *extra_v_hat)``."""

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, *extras: Tensor, **kwargs: Any) -> Any: ...


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
        # s = exp(n), n ~ N(0, 1): the time whose noise-to-signal ratio sigma/alpha is s, as REPA
        # draws it. On the linear path t = s / (1 + s) = sigmoid(n); on the cosine path
        # tan(pi t / 2) = s, so t = (2 / pi) atan(exp(n)). Both have median 0.5.
        n = torch.randn(batch, device=device)
        if self.config.path == "cosine":
            return torch.atan(torch.exp(n)) * (2 / math.pi)
        return torch.sigmoid(n)

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

    def draw(self, x: Tensor, y: Tensor, extras: Sequence[Tensor] = ()) -> Draws:
        """A step's randomness for the whole batch, from the global RNG in a fixed order: times,
        latent noise, label dropout, then the noise of each extra state component."""
        t = self.sample_t(x.shape[0], x.device)  # (B,)
        noise = torch.randn_like(x)  # (B, C, H, W)
        y_used = self.drop_labels(y)
        return Draws(t, noise, y_used, [torch.randn_like(e) for e in extras])

    def training_losses(self, model: VelocityModel, x: Tensor, y: Tensor, extras: Sequence[Tensor] = (),
                        align: bool = True, draws: Draws | None = None) -> FlowLosses:
        """One flow-matching step's loss on clean latents x (B, C, H, W) with labels y (B,).

        ``extras`` are further clean state components the model denoises jointly with the latent
        (e.g. a (B, Z) CLS token): each is noised on the same path at the same time with its own
        noise, and the model is called as
        ``model(x_t, t, y, *extras_t, align=align) -> (v_hat, zs, *extra_v_hat)``. ``draws`` are
        this batch's random draws (:meth:`draw`, made here when not given; a gradient-accumulation
        micro-batch passes its slice of the whole batch's).

        Returns the step's :class:`FlowLosses`.
        """
        d = draws if draws is not None else self.draw(x, y, extras)
        assert d.noise is not None, "training_losses needs noise draws"
        x_t, v = self.interpolate(x, d.noise, d.t)
        noisy = [self.interpolate(e, n, d.t) for e, n in zip(extras, d.extra_noise)]  # [(e_t, v_e)]
        out = model(x_t, d.t, d.y_used, *[e_t for e_t, _ in noisy], align=align)
        v_hat, zs = out[0], out[1]
        denoise = (v_hat.float() - v.float()).pow(2).mean()
        extra = [(e_hat.float() - v_e.float()).pow(2).mean() for e_hat, (_, v_e) in zip(out[2:], noisy)]
        return FlowLosses(denoise, zs, extra, d.t, d.y_used)


@dataclass
class FlowLosses:
    """What :meth:`Transport.training_losses` gives: ``denoise`` (scalar ``mean((v_hat - v)^2)`` in
    fp32), ``zs`` (the model's projected tokens, for the alignment loss), ``denoise_extras`` (one
    such scalar per extra state component), ``t`` (B,) and ``y_used`` (the labels after dropout,
    the ones the model saw)."""

    denoise: Tensor
    zs: Any
    denoise_extras: list[Tensor]
    t: Tensor
    y_used: Tensor


@dataclass
class Draws:
    """The random draws of one training step: times t (B,), latent noise (B, C, H, W) (None where
    the step needs none, e.g. the encoder warm-up at t = 0), the labels after dropout (B,) and the
    noise of each extra state component."""

    t: Tensor
    noise: Tensor | None
    y_used: Tensor
    extra_noise: list[Tensor]

    def slice(self, rows: slice) -> Draws:
        """The draws of rows ``rows`` of the batch (a gradient-accumulation micro-batch)."""
        return Draws(self.t[rows], None if self.noise is None else self.noise[rows], self.y_used[rows],
                     [n[rows] for n in self.extra_noise])
