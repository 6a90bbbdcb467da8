"""Samplers against a velocity field known in closed form.

For Gaussian data x ~ N(m, s^2 I) and the linear path x_t = (1-t) x + t eps, (x_t, v = eps - x) is
jointly Gaussian, so the exact velocity is the conditional mean

    v*(x, t) = E[v | x_t = x] = -m + (t - a s^2) / (a^2 s^2 + t^2) * (x - a m),   a = 1 - t,

and the flow dx/dt = v* from t=1 maps noise z to x(t) = a m + sqrt(a^2 s^2 + t^2) z, i.e. exactly
x(0) = m + s z. Per-class means give a conditional model; the null class has its own mean.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from repa_cache.cache.errors import UsageError
from repa_cache.eval.config import SampleConfig
from repa_cache.eval.sample import sample_batch
from repa_cache.eval.samplers import (
    SamplerConfig,
    parse_guidance_interval,
    sample_labels,
    sample_latents,
    score_from_velocity,
)
from repa_cache.train.config import SamplingDefaults
from repa_cache.train.methods import make_method
from repa_cache.train.model import sit_config
from repa_cache.train.noise import SampleNoise

SHAPE = (1, 2, 2)


class GaussianVelocity:
    """Exact velocity of class-conditional data N(means[y], s^2 I); records its calls."""

    def __init__(self, means: list[float], s: float) -> None:
        self.means = torch.tensor(means, dtype=torch.float64)
        self.s = s
        self.calls: list[tuple[int, float]] = []

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        self.calls.append((x.shape[0], float(t[0])))
        x, t = x.double(), t.double().view(-1, 1, 1, 1)
        m = self.means[y].view(-1, 1, 1, 1)
        a, s2 = 1 - t, self.s**2
        v = -m + (t - a * s2) / (a * a * s2 + t * t) * (x - a * m)
        return v.float(), []


NULL = 2  # class index of the "unconditional" mean
MEANS = [2.0, -1.0, 0.5]  # class 0, class 1, null


def _noise(n: int, seed: int = 0) -> tuple[SampleNoise, Tensor]:
    noise = SampleNoise(seed, range(n))
    return noise, noise.randn(SHAPE)


def test_exact_velocity_formula_matches_the_path() -> None:
    """The closed-form v* is the regression of v = eps - x on x_t (checked by Monte Carlo)."""
    g = torch.Generator().manual_seed(0)
    m, s, t = 2.0, 0.5, 0.3
    x = m + s * torch.randn(1_000_000, generator=g, dtype=torch.float64)
    eps = torch.randn(1_000_000, generator=g, dtype=torch.float64)
    xt, v = (1 - t) * x + t * eps, eps - x
    slope = ((xt - xt.mean()) * (v - v.mean())).mean() / xt.var()
    a = 1 - t
    assert slope.item() == pytest.approx((t - a * s * s) / (a * a * s * s + t * t), abs=0.012)  # 5 sigma
    assert v.mean().item() == pytest.approx(-m, abs=5e-3)


@pytest.mark.parametrize("heun,steps,tol", [(False, 64, 0.06), (True, 32, 0.01)])
def test_ode_maps_noise_to_the_data_distribution(heun: bool, steps: int, tol: float) -> None:
    model = GaussianVelocity(MEANS, s=0.5)
    _, x1 = _noise(3000)
    y = torch.zeros(3000, dtype=torch.long)
    z = sample_latents(model, x1, y, SamplerConfig(sampler="ode", steps=steps, heun=heun), NULL).double()
    exact = MEANS[0] + 0.5 * x1  # the exact flow map, sample by sample
    assert (z - exact).abs().max().item() < tol
    assert z.mean().item() == pytest.approx(MEANS[0], abs=0.03)
    assert z.std().item() == pytest.approx(0.5, abs=0.03)
    assert len(model.calls) == (2 * steps - 1 if heun else steps)  # no Heun stage on the last step


def test_heun_is_more_accurate_than_euler_at_equal_steps() -> None:
    _, x1 = _noise(256)
    y = torch.ones(256, dtype=torch.long)
    exact = MEANS[1] + 0.5 * x1
    for steps in (8, 16, 32):
        errors = {}
        for heun in (False, True):
            z = sample_latents(GaussianVelocity(MEANS, 0.5), x1, y, SamplerConfig("ode", steps, heun), NULL)
            errors[heun] = (z.double() - exact).abs().mean().item()
        assert errors[True] < 0.5 * errors[False], (steps, errors)


def test_sde_reaches_the_data_distribution() -> None:
    model = GaussianVelocity(MEANS, s=0.5)
    noise, x1 = _noise(2000, seed=3)
    y = torch.zeros(2000, dtype=torch.long)
    z = sample_latents(model, x1, y, SamplerConfig(sampler="sde", steps=40), NULL, noise).double()
    assert z.mean().item() == pytest.approx(MEANS[0], abs=0.04)
    assert z.std().item() == pytest.approx(0.5, abs=0.04)
    times = [t for _, t in model.calls]
    assert len(times) == 40 and times[0] == 1.0 and times[-1] == pytest.approx(0.04)


def test_score_from_velocity() -> None:
    """The score of x_t = a x0 + s eps is -eps/s; it is recovered exactly from v = a' x0 + s' eps."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    for path in ("linear", "cosine"):
        t = 0.37
        if path == "linear":
            a, s, da, ds = 1 - t, t, -1.0, 1.0
        else:
            a, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
            da, ds = -math.pi / 2 * s, math.pi / 2 * a
        xt, v = a * x0 + s * eps, da * x0 + ds * eps
        torch.testing.assert_close(score_from_velocity(v, xt, t, path), -eps / s)


def test_full_interval_guidance_moves_the_mean_as_predicted() -> None:
    """v is affine in the class mean, so guidance w over all t gives mean m_u + w (m_c - m_u)."""
    _, x1 = _noise(1000)
    y = torch.zeros(1000, dtype=torch.long)
    w = 1.5
    cfg = SamplerConfig("ode", 32, heun=True, cfg_scale=w, guidance_interval=(0.0, 1.0))
    z = sample_latents(GaussianVelocity(MEANS, 0.5), x1, y, cfg, NULL).double()
    guided_mean = MEANS[NULL] + w * (MEANS[0] - MEANS[NULL])
    torch.testing.assert_close(z, guided_mean + 0.5 * x1, atol=0.01, rtol=0)


@pytest.mark.parametrize("sampler", ["ode", "sde"])
def test_guidance_only_inside_its_interval(sampler: str) -> None:
    steps = 5  # ODE times 1, .8, .6, .4, .2; SDE times 1, .76, .52, .28, .04
    y = torch.tensor([0, 1, 0, 1])

    def run(cfg_scale: float, interval: tuple[float, float]) -> tuple[Tensor, GaussianVelocity]:
        noise, x1 = _noise(4, seed=7)
        model = GaussianVelocity(MEANS, 0.5)
        cfg = SamplerConfig(sampler, steps, cfg_scale=cfg_scale, guidance_interval=interval)
        return sample_latents(model, x1, y, cfg, NULL, noise), model

    plain, _ = run(1.0, (0.0, 1.0))
    outside, model = run(4.0, (0.85, 0.95))  # no step starts inside
    assert torch.equal(outside, plain)
    assert all(b == 4 for b, _ in model.calls)  # and no doubled batch was run
    inside, model = run(4.0, (0.3, 0.7))
    assert not torch.allclose(inside, plain)
    doubled = [t for b, t in model.calls if b == 8]
    assert doubled and all(0.3 <= t <= 0.7 for t in doubled)


def test_samples_do_not_depend_on_the_batch() -> None:
    """Each sample has its own noise stream: one batch of 6 equals batches of 4 and 2."""
    y = sample_labels(5, range(6), 2)
    cfg = SamplerConfig("sde", 6)

    def run(indices: list[int]) -> Tensor:
        noise = SampleNoise(5, indices)
        return sample_latents(GaussianVelocity(MEANS, 0.5), noise.randn(SHAPE), y[indices], cfg, NULL, noise)

    whole = run(list(range(6)))
    parts = torch.cat([run([0, 1, 2, 3]), run([4, 5])])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-6)
    assert not torch.allclose(run([0, 1]), run([2, 3]))  # and samples differ from each other
    assert torch.equal(sample_labels(5, [3, 4], 2), y[3:5])
    assert sample_labels(0, range(5), 1000, classes=[7, 9]).tolist() == [7, 9, 7, 9, 7]


def test_seeded_and_reproducible() -> None:
    a = SampleNoise(1, [0, 1]).randn(SHAPE)
    b = SampleNoise(1, [0, 1]).randn(SHAPE)
    c = SampleNoise(2, [0, 1]).randn(SHAPE)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(guidance_interval=(0.2, 1.3)), "within [0, 1]"),
        (dict(guidance_interval=(-0.1, 0.5)), "within [0, 1]"),
        (dict(guidance_interval=(0.7, 0.2)), "LOW <= HIGH"),
        (dict(steps=0), "--steps"),
        (dict(sampler="ddim"), "unknown sampler"),
        (dict(sampler="sde", heun=True), "--heun"),
        (dict(cfg_scale=float("nan")), "--cfg"),
    ],
)
def test_bad_settings_are_one_line_usage_errors(kwargs: dict, words: str) -> None:
    with pytest.raises(UsageError) as err:
        SamplerConfig(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_parse_guidance_interval() -> None:
    assert parse_guidance_interval("0,0.7") == (0.0, 0.7)
    for bad in ("0.7", "a,b", "0.8,0.1", "0,2"):
        with pytest.raises(UsageError):
            parse_guidance_interval(bad)


def test_sampler_defaults_are_repas_which_a_job_takes_when_the_card_records_none() -> None:
    job, sampler = SampleConfig().resolve(SamplingDefaults()), SamplerConfig()
    assert (sampler.sampler, sampler.steps, sampler.heun, sampler.cfg_scale, sampler.guidance_interval) == (
        job.sampler, job.steps, job.heun, job.cfg_scale, job.guidance_interval) == ("sde", 250, False, 1.0, (0.0, 0.7))
    assert job.cls_cfg_scale is None
    bare = SampleConfig()  # nothing set: every sampler setting is the checkpoint's method's
    assert (bare.sampler, bare.steps, bare.heun, bare.cfg_scale, bare.guidance_interval, bare.cls_cfg_scale) == (None,) * 6


def test_a_job_takes_the_methods_sampling_settings_it_does_not_set() -> None:
    reg = SamplingDefaults(cfg_scale=2.3, guidance_interval=(0.0, 0.85), cls_cfg_scale=2.3)
    job = SampleConfig().resolve(reg)
    assert (job.sampler, job.steps, job.heun, job.cfg_scale, job.guidance_interval, job.cls_cfg_scale) == (
        "sde", 250, False, 2.3, (0.0, 0.85), 2.3)
    mine = SampleConfig(cfg_scale=1.5, steps=20, sampler="ode", heun=True, guidance_interval=(0.1, 0.6)).resolve(reg)
    assert (mine.sampler, mine.steps, mine.heun, mine.cfg_scale, mine.guidance_interval) == ("ode", 20, True, 1.5, (0.1, 0.6))
    assert mine.cls_cfg_scale is None  # a --cfg given without --cls-cfg: the CLS token follows it, as before
    assert SampleConfig(cls_cfg_scale=0.0).resolve(reg).cls_cfg_scale == 0.0
    assert SampleConfig(cls_cfg_scale=4.0, cfg_scale=1.5).resolve(reg).cls_cfg_scale == 4.0


class JointVelocity(torch.nn.Module):
    """A velocity model of a latent and a CLS token, simple enough to integrate by hand: with
    ``g = label + 1`` for a class and 0 for the null class ``NULL``, ``v = x/2 + g * mean(cls)`` and
    ``v_cls = g * cls + 1``."""

    NULL = 3

    def forward(self, x: Tensor, t: Tensor, y: Tensor, cls: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        g = torch.where(y == self.NULL, 0.0, y.float() + 1)  # (B,)
        return 0.5 * x + (g * cls.mean(dim=1)).view(-1, 1, 1, 1), [], g.view(-1, 1) * cls + 1.0


def test_cls_cfg_zero_takes_the_conditional_cls_drift_as_regs_sampler() -> None:
    config = sit_config("SiT-tiny/2", input_size=4, in_channels=2, num_classes=JointVelocity.NULL, z_dims=(3,))
    scfg = SamplerConfig(sampler="ode", steps=2, cfg_scale=2.0, guidance_interval=(0.0, 1.0))
    indices, classes = [0, 1], (1, 2)
    got = sample_batch(JointVelocity(), make_method("reg"), config, scfg, 5, indices, classes, cls_cfg_scale=0.0)

    def by_hand(cls_drift: str) -> Tensor:
        noise = SampleNoise(5, indices)
        x, c = noise.randn((2, 4, 4)).double(), noise.randn((3,)).double()  # the latent's noise first, then the CLS token's
        g = torch.tensor([2.0, 3.0], dtype=torch.float64)  # classes 1 and 2
        for _ in range(2):  # Euler from t = 1 to 0.5 to 0: dt = -0.5, guided at both steps
            v_cond, v_uncond = 0.5 * x + (g * c.mean(dim=1)).view(-1, 1, 1, 1), 0.5 * x
            c_cond, c_uncond = g.view(-1, 1) * c + 1.0, torch.ones_like(c)
            x = x - 0.5 * (v_uncond + 2.0 * (v_cond - v_uncond))
            c = c - 0.5 * (c_cond if cls_drift == "cond" else c_uncond)
        return x.float()

    torch.testing.assert_close(got, by_hand("cond"), rtol=1e-5, atol=1e-5)
    assert (got - by_hand("uncond")).abs().max() > 0.1  # what a scale of 0 gave before: the unconditional CLS drift
    same = sample_batch(JointVelocity(), make_method("reg"), config, scfg, 5, indices, classes, cls_cfg_scale=1.0)
    torch.testing.assert_close(same, got)  # scale 1 is the conditional drift too
