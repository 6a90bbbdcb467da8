"""Samplers for a velocity model: ODE Euler / Heun and SDE Euler–Maruyama, with guidance.

Convention (as in training): ``x_t = alpha(t) x + sigma(t) eps`` with t=0 data and t=1 noise, and
the model predicts ``v = dx_t/dt``. Sampling integrates from t=1 (pure noise) to t=0 (data).

* **ODE** (probability flow): ``dx = v(x, t) dt`` on the uniform grid ``t_i = 1 - i/steps``, with
  Euler or Heun steps (Heun's correction is skipped on the last step, which ends at t=0).
* **SDE** (reverse-time Euler–Maruyama, as REPA's sampler): drift ``v - w(t)/2 * score`` with
  ``w(t) = 2t`` and the score obtained from the velocity, noise ``sqrt(w(t) |dt|) * z``; the grid
  is ``steps`` points from 1 down to ``last_t`` (0.04) and the final step from ``last_t`` to 0 is
  the deterministic drift step. Either way the model is evaluated ``steps`` times (doubled batch
  inside the guidance interval; twice per step for Heun).
* **Classifier-free guidance**: ``v = v_uncond + scale * (v_cond - v_uncond)`` on the drift, only
  at steps whose start time ``t`` lies in ``[low, high]``; elsewhere the conditional model alone
  runs (no doubled batch). The unconditional label is the null class ``num_classes``, or the
  condition the method gives (:meth:`~repa_cache.train.methods.base.Method.null_condition`: GMem's
  zero vector), passed as ``null_y``.

All randomness (initial noise and SDE increments) comes from
:class:`~repa_cache.train.noise.SampleNoise`: one generator per sample, seeded from
``(seed, sample index)``, so a sample does not depend on the batch it is in, on the batch size,
or on how the job is split across ranks. The path formulas are the trainer's
(:func:`~repa_cache.train.transport.path_coefficients`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from repa_cache.cache.errors import UsageError, unknown_name
from repa_cache.stages.devices import autocast
from repa_cache.train.config import PATHS, SamplingDefaults
from repa_cache.train.noise import SampleNoise, sample_seed
from repa_cache.train.transport import VelocityModel, path_coefficients

logger = logging.getLogger(__name__)

SAMPLERS = ("ode", "sde")
REPA_SAMPLING = SamplingDefaults()
#: REPA's SDE sampler stops the stochastic steps here and ends with one deterministic step to 0.
SDE_LAST_T = 0.04


@dataclass(frozen=True)
class SamplerConfig:
    """How to integrate from noise to data.

    Attributes:
        sampler: ``"ode"`` (Euler / Heun) or ``"sde"`` (Euler–Maruyama, diffusion ``2t``).
        steps: model evaluations per sample (per Heun stage, per guidance half).
        heun: second-order Heun steps (ODE only).
        cfg_scale: classifier-free guidance scale; 1 means no guidance.
        guidance_interval: ``(low, high)``; guidance applies at steps starting at ``low <= t <= high``.
        path: the interpolant the model was trained with (``"linear"`` or ``"cosine"``).
        last_t: time at which the SDE sampler switches to its final deterministic step.
    """

    sampler: str = REPA_SAMPLING.sampler  # the defaults are REPA's, as a method's without a record of its own
    steps: int = REPA_SAMPLING.steps
    heun: bool = REPA_SAMPLING.heun
    cfg_scale: float = REPA_SAMPLING.cfg_scale
    guidance_interval: tuple[float, float] = REPA_SAMPLING.guidance_interval
    path: str = "linear"
    last_t: float = SDE_LAST_T

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance_interval", tuple(float(v) for v in self.guidance_interval))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UsageError` with one line when the settings cannot work."""
        if self.sampler not in SAMPLERS:
            raise unknown_name("sampler", self.sampler, list(SAMPLERS))
        if self.path not in PATHS:
            raise UsageError(f"unknown path '{self.path}'; known paths: {', '.join(PATHS)}")
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}")
        if self.sampler == "sde" and self.steps < 2:
            raise UsageError("the SDE sampler needs --steps of at least 2 (the last step is deterministic)")
        if self.sampler == "sde" and self.heun:
            raise UsageError("--heun applies to the ODE sampler only; use --sampler ode or --euler")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise UsageError(f"--cfg must be a finite number >= 0, got {self.cfg_scale}")
        check_guidance_interval(self.guidance_interval)
        if not 0.0 < self.last_t < 1.0:
            raise UsageError(f"the SDE switch time must be in (0, 1), got {self.last_t}")

    @property
    def guided(self) -> bool:
        """Whether guidance can change anything (scale other than 1)."""
        return self.cfg_scale != 1.0

    def guidance_active(self, t: float) -> bool:
        """Whether guidance applies to a step that starts at time ``t``."""
        low, high = self.guidance_interval
        return self.guided and low <= t <= high

    def time_grid(self) -> Tensor:
        """The float64 times visited, from 1 down to 0 (``steps + 1`` points)."""
        if self.sampler == "ode":
            return torch.linspace(1.0, 0.0, self.steps + 1, dtype=torch.float64)
        head = torch.linspace(1.0, self.last_t, self.steps, dtype=torch.float64)
        return torch.cat([head, torch.zeros(1, dtype=torch.float64)])


def check_guidance_interval(interval: Sequence[float]) -> tuple[float, float]:
    """Validate a guidance interval ``(low, high)`` with ``0 <= low <= high <= 1``."""
    if len(interval) != 2:
        raise UsageError(f"--guidance-interval takes two numbers LOW,HIGH, got {len(interval)}")
    low, high = (float(v) for v in interval)
    if not (0.0 <= low <= 1.0 and 0.0 <= high <= 1.0):
        raise UsageError(f"--guidance-interval must lie within [0, 1], got {low:g},{high:g}")
    if low > high:
        raise UsageError(f"--guidance-interval needs LOW <= HIGH, got {low:g},{high:g}")
    return low, high


def parse_guidance_interval(text: str) -> tuple[float, float]:
    """Parse ``"LOW,HIGH"`` (e.g. ``"0,0.7"``) into a validated interval."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise UsageError(f"--guidance-interval takes LOW,HIGH such as 0,0.7, got '{text}'") from None
    return check_guidance_interval(values)


# --------------------------------------------------------------------------------------------
# labels


def sample_labels(seed: int, indices: Sequence[int], num_classes: int, classes: Sequence[int] = ()) -> Tensor:
    """Class label of each sample: ``classes[i % len(classes)]``, or uniform from ``(seed, i)``."""
    if classes:
        return torch.tensor([int(classes[i % len(classes)]) for i in indices], dtype=torch.long)
    labels = [int(np.random.default_rng(sample_seed(seed, i, stream=1)).integers(num_classes)) for i in indices]
    return torch.tensor(labels, dtype=torch.long)


def bank_choices(seed: int, indices: Sequence[int], size: int) -> list[int]:
    """Memory-bank entry of each sample (GMem): uniform over ``size`` entries from ``(seed, i)``, a
    stream of its own, so it depends neither on the batch nor on the other samples."""
    if size < 1:
        raise UsageError("the memory bank is empty")
    return [int(np.random.default_rng(sample_seed(seed, i, stream=2)).integers(size)) for i in indices]


# --------------------------------------------------------------------------------------------
# integration


def score_from_velocity(v: Tensor, x: Tensor, t: float, path: str = "linear") -> Tensor:
    """Score ``grad log p_t(x)`` implied by a velocity prediction at time ``t`` (0 < t).

    With ``x = alpha x0 + sigma eps`` and ``v = alpha' x0 + sigma' eps``, eliminating ``x0`` gives
    ``eps = (alpha v - alpha' x) / (alpha sigma' - alpha' sigma)`` and the score is ``-eps / sigma``.
    On the linear path this is ``((t - 1) v - x) / t``.
    """
    tt = torch.tensor(t, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = (float(a) for a in path_coefficients(path, tt))
    eps = (alpha * v - d_alpha * x) / (alpha * d_sigma - d_alpha * sigma)
    return -eps / sigma


class _Drift:
    """Evaluates the (guided) velocity of the model at one time for a batch.

    The state is a list of components: the latent, then any extra state the model denoises
    jointly (REG's CLS token), each with its own guidance scale; a scale of None takes the
    component's conditional drift alone where guidance applies. The model is called as
    ``model(x, t, y, *extras) -> (v, zs, *extra_v)``; the guided batch stacks ``y`` and its
    unconditional counterpart ``null_y`` (default: the null class).
    """

    def __init__(self, model: VelocityModel, y: Tensor, null_class: int, cfg: SamplerConfig,
                 precision: str, scales: Sequence[float | None], null_y: Tensor | None = None) -> None:
        self.model, self.cfg, self.precision = model, cfg, precision
        self.y = y
        null = null_y if null_y is not None else torch.full_like(y, null_class)
        if null.shape != y.shape:
            raise ValueError(f"null condition of shape {tuple(null.shape)} for conditions of shape {tuple(y.shape)}")
        self.y_pair = torch.cat([y, null])  # (2B,) labels or (2B, Z) conditions
        self.scales = list(scales)
        self.evaluations = 0

    def velocity(self, xs: list[Tensor], t: float, guided: bool) -> tuple[list[Tensor], list[Tensor]]:
        """``(v, x_in)`` per component: float64 velocity (B, ...) and, when guided, (2B, ...) halves stacked."""
        x_in = [torch.cat([x, x]) if guided else x for x in xs]  # (B or 2B, ...) each
        y_in = self.y_pair if guided else self.y
        t_in = torch.full((x_in[0].shape[0],), t, device=xs[0].device, dtype=torch.float32)
        with autocast(xs[0].device, self.precision):
            out = self.model(x_in[0].float(), t_in, y_in, *[e.float() for e in x_in[1:]])
        self.evaluations += 1
        return [v.to(torch.float64) for v in (out[0], *out[2:])], x_in

    def combine(self, ds: list[Tensor], guided: bool) -> list[Tensor]:
        """Guidance on stacked (cond, uncond) drifts, each component with its scale; identity when not guided."""
        if not guided:
            return ds
        out = []
        for d, scale in zip(ds, self.scales):
            cond, uncond = d.chunk(2)
            out.append(cond if scale is None else uncond + scale * (cond - uncond))
        return out


@torch.no_grad()
def sample_latents(
    model: VelocityModel,
    noise: Tensor,
    y: Tensor,
    config: SamplerConfig,
    null_class: int,
    step_noise: SampleNoise | None = None,
    precision: str = "fp32",
    null_y: Tensor | None = None,
) -> Tensor:
    """Integrate a batch from noise (t=1) to data (t=0).

    Args:
        model: ``model(x, t, y) -> (v, ...)``; called with float32 inputs.
        noise: initial noise (B, C, H, W) on the model's device.
        y: class labels (B,) long on the same device (GMem: (B, Z) condition vectors).
        config: the sampler settings.
        null_class: label of the unconditional model (the SiT's ``num_classes``).
        step_noise: source of the SDE increments (required for ``"sde"``), one stream per sample.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 on CUDA).
        null_y: the unconditional input of guidance, shaped like y; default: the null class.

    Returns:
        float32 latents (B, C, H, W) at t=0.
    """
    return sample_joint(model, [noise], y, config, null_class, [config.cfg_scale], step_noise, precision, null_y)[0]


@torch.no_grad()
def sample_joint(
    model: VelocityModel,
    noises: Sequence[Tensor],
    y: Tensor,
    config: SamplerConfig,
    null_class: int,
    scales: Sequence[float | None],
    step_noise: SampleNoise | None = None,
    precision: str = "fp32",
    null_y: Tensor | None = None,
) -> list[Tensor]:
    """Integrate a joint state (the latent and extra components, e.g. REG's CLS token) from noise
    (t=1) to data (t=0); ``scales`` is the guidance scale of each component (the latent's first;
    None: that component's conditional drift alone, unguided). Guidance applies to every component
    at the same steps (the guidance interval); its
    unconditional branch gets ``null_y`` (default: the null class). SDE increments are drawn per
    step for each component in order, so a latent-only state draws exactly what
    :func:`sample_latents` always drew. Returns float32 components at t=0."""
    if any(n.shape[0] != y.shape[0] for n in noises):
        raise ValueError(f"{[n.shape[0] for n in noises]} noise samples but {y.shape[0]} labels")
    if len(scales) != len(noises):
        raise ValueError(f"{len(scales)} guidance scales for {len(noises)} state components")
    drift = _Drift(model, y, null_class, config, precision, scales, null_y)
    xs = [n.to(torch.float64) for n in noises]
    times = config.time_grid().tolist()
    if config.sampler == "ode":
        xs = _ode(drift, xs, times, config)
    else:
        if step_noise is None:
            raise ValueError("the SDE sampler needs a SampleNoise for its increments")
        xs = _sde(drift, xs, times, config, step_noise)
    return [x.float() for x in xs]


def _ode(drift: _Drift, xs: list[Tensor], times: list[float], cfg: SamplerConfig) -> list[Tensor]:
    last = len(times) - 2
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        guided = cfg.guidance_active(t)
        dt = t_next - t
        v, _ = drift.velocity(xs, t, guided)
        d = drift.combine(v, guided)
        x_next = [x + dt * di for x, di in zip(xs, d)]
        if cfg.heun and i < last:
            v2, _ = drift.velocity(x_next, t_next, guided)  # guidance decided by the step's start
            d2 = drift.combine(v2, guided)
            x_next = [x + dt * 0.5 * (a + b) for x, a, b in zip(xs, d, d2)]
        xs = x_next
    return xs


def _sde(drift: _Drift, xs: list[Tensor], times: list[float], cfg: SamplerConfig, noise: SampleNoise) -> list[Tensor]:
    for i, (t, t_next) in enumerate(itertools.pairwise(times)):
        guided = cfg.guidance_active(t)
        dt = t_next - t
        w = 2.0 * t  # diffusion coefficient w(t) = g(t)^2, as in REPA
        v, x_in = drift.velocity(xs, t, guided)
        d = drift.combine([vi - 0.5 * w * score_from_velocity(vi, xi, t, cfg.path) for vi, xi in zip(v, x_in)], guided)
        if i == len(times) - 2:  # final step to t=0: the drift alone
            return [x + dt * di for x, di in zip(xs, d)]
        xs = [x + dt * di + math.sqrt(w * abs(dt)) * noise.randn(tuple(x.shape[1:])) for x, di in zip(xs, d)]
    return xs
