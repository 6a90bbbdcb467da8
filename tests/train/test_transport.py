"""Transport: interpolant formulas, time sampling, label dropout applied once, the loss value."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from repa_cache.cache.errors import UsageError
from repa_cache.train.config import TransportConfig
from repa_cache.train.model import SiT, sit_config
from repa_cache.train.transport import Transport, path_coefficients


def _data(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, 6, 6, generator=g), torch.randn(5, 4, 6, 6, generator=g)


def test_linear_path_endpoints_and_velocity() -> None:
    tr = Transport()
    x, eps = _data()
    x0, v0 = tr.interpolate(x, eps, torch.zeros(5))
    x1, v1 = tr.interpolate(x, eps, torch.ones(5))
    assert torch.equal(x0, x)
    assert torch.equal(x1, eps)
    assert torch.equal(v0, eps - x) and torch.equal(v1, eps - x)


def test_linear_path_random_times_per_sample() -> None:
    tr = Transport()
    x, eps = _data(1)
    t = torch.tensor([0.1, 0.35, 0.5, 0.8, 0.99])
    x_t, v = tr.interpolate(x, eps, t)
    for i in range(5):  # each sample uses its own t
        torch.testing.assert_close(x_t[i], (1 - t[i]) * x[i] + t[i] * eps[i])
    torch.testing.assert_close(v, eps - x)


def test_cosine_path_values_and_derivatives() -> None:
    tr = Transport(TransportConfig(path="cosine"))
    t = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = tr.alpha_sigma(t)
    r, hp = math.sqrt(0.5), math.pi / 2
    torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0, r], dtype=torch.float64))
    torch.testing.assert_close(sigma, torch.tensor([0.0, 1.0, r], dtype=torch.float64))
    torch.testing.assert_close(d_alpha, torch.tensor([0.0, -hp, -hp * r], dtype=torch.float64))
    torch.testing.assert_close(d_sigma, torch.tensor([hp, 0.0, hp * r], dtype=torch.float64))
    # derivatives agree with central differences at random times
    s = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    h = 1e-6
    a_p, s_p, _, _ = tr.alpha_sigma(s + h)
    a_m, s_m, _, _ = tr.alpha_sigma(s - h)
    _, _, da, ds = tr.alpha_sigma(s)
    torch.testing.assert_close(da, (a_p - a_m) / (2 * h))
    torch.testing.assert_close(ds, (s_p - s_m) / (2 * h))


def test_cosine_interpolate() -> None:
    tr = Transport(TransportConfig(path="cosine"))
    x, eps = _data(3)
    t = torch.full((5,), 0.5)
    x_t, v = tr.interpolate(x, eps, t)
    r, hp = math.sqrt(0.5), math.pi / 2
    torch.testing.assert_close(x_t, r * x + r * eps)
    torch.testing.assert_close(v, -hp * r * x + hp * r * eps)


def test_uniform_time_sampling() -> None:
    torch.manual_seed(0)
    t = Transport().sample_t(100_000, "cpu")
    assert t.shape == (100_000,) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() < 1
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (t < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.01)


def test_lognormal_time_sampling() -> None:
    torch.manual_seed(0)
    t = Transport(TransportConfig(time_sampling="lognormal")).sample_t(100_000, "cpu")
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    # t < s/(1+s) at s = e  <=>  N(0,1) < 1: probability Phi(1) = 0.8413 (uniform would give 0.731)
    assert (t < math.e / (1 + math.e)).float().mean().item() == pytest.approx(0.8413, abs=0.01)


def test_label_dropout_rate() -> None:
    torch.manual_seed(0)
    tr = Transport(TransportConfig(label_dropout=0.1, null_class=1000))
    y = torch.randint(0, 1000, (100_000,))
    out = tr.drop_labels(y)
    dropped = out == 1000
    assert dropped.float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert torch.equal(out[~dropped], y[~dropped])
    assert torch.equal(Transport(TransportConfig(label_dropout=0.0)).drop_labels(y), y)
    assert (Transport(TransportConfig(label_dropout=1.0)).drop_labels(y) == 1000).all()


class Recorder(nn.Module):
    """A real model that remembers the labels it was called with."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor, y: Tensor, **kw: object) -> tuple[Tensor, list[Tensor]]:
        self.seen.append(y.clone())
        return self.model(x, t, y, **kw)


def _tiny_sit(num_classes: int = 10) -> SiT:
    return SiT(sit_config("SiT-tiny/2", input_size=4, num_classes=num_classes, z_dims=(8,),
                          projector_dim=16))


def test_training_losses_drops_labels_once() -> None:
    torch.manual_seed(0)
    model = Recorder(_tiny_sit())
    tr = Transport(TransportConfig(label_dropout=0.1, null_class=10))
    x = torch.randn(8_000, 4, 4, 4)
    y = torch.full((8_000,), 3)
    with torch.no_grad():
        out = tr.training_losses(model, x, y)
    assert len(model.seen) == 1
    assert torch.equal(model.seen[0], out.y_used)
    rate = (out.y_used == 10).float().mean().item()
    assert rate == pytest.approx(0.1, abs=0.015)  # twice would give 0.19
    assert set(out.y_used.unique().tolist()) == {3, 10}


def test_training_losses_value_and_rng_order() -> None:
    model = _tiny_sit()
    with torch.no_grad():
        for p in model.parameters():  # move off the zero init so the prediction is not 0
            p.add_(0.05 * torch.randn_like(p))
    tr = Transport(TransportConfig(label_dropout=0.5, null_class=10))
    x = torch.randn(6, 4, 4, 4)
    y = torch.arange(6)
    torch.manual_seed(7)
    with torch.no_grad():
        out = tr.training_losses(model, x, y)
    assert out.zs[0].shape == (6, 4, 8)
    # Replay the documented order: times, then noise, then label dropout, all from the global RNG.
    torch.manual_seed(7)
    t = torch.rand(6)
    eps = torch.randn_like(x)
    drop = torch.rand(6) < 0.5
    y_ref = torch.where(drop, torch.full_like(y, 10), y)
    x_t = (1 - t).view(6, 1, 1, 1) * x + t.view(6, 1, 1, 1) * eps
    with torch.no_grad():
        v_hat, _ = model(x_t, t, y_ref)
    assert torch.equal(out.t, t)
    assert torch.equal(out.y_used, y_ref)
    assert out.denoise.item() == pytest.approx(((v_hat - (eps - x)) ** 2).mean().item(), rel=1e-6)
    # The same seed gives the same step: what exact resume relies on.
    torch.manual_seed(7)
    with torch.no_grad():
        again = tr.training_losses(model, x, y)
    assert torch.equal(again.denoise, out.denoise)


def test_zero_init_model_loss_is_mean_v_squared() -> None:
    model = _tiny_sit()
    tr = Transport(TransportConfig(label_dropout=0.0, null_class=10))
    x = torch.randn(4, 4, 4, 4)
    torch.manual_seed(3)
    out = tr.training_losses(model, x, torch.zeros(4, dtype=torch.long))
    torch.manual_seed(3)
    torch.rand(4)
    eps = torch.randn_like(x)
    assert out.denoise.item() == pytest.approx(((eps - x) ** 2).mean().item(), rel=1e-6)


def test_config_validation() -> None:
    with pytest.raises(UsageError, match="unknown path 'vp'; known paths: linear, cosine"):
        TransportConfig(path="vp")
    with pytest.raises(UsageError, match="unknown time sampling 'logit'"):
        TransportConfig(time_sampling="logit")
    with pytest.raises(UsageError, match="label-dropout"):
        TransportConfig(label_dropout=1.5)


@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_lognormal_times_are_those_whose_noise_to_signal_ratio_is_exp_n(path: str) -> None:
    """REPA's lognormal sampling: s = exp(n), n ~ N(0, 1), is sigma/alpha; t = s/(1+s) on the
    linear path and (2/pi) atan(s) on the cosine path."""
    tr = Transport(TransportConfig(path=path, time_sampling="lognormal"))
    torch.manual_seed(5)
    t = tr.sample_t(200_000, "cpu").double()
    torch.manual_seed(5)
    s = torch.randn(200_000).double().exp()
    want = s / (1 + s) if path == "linear" else torch.atan(s) * (2 / math.pi)
    torch.testing.assert_close(t, want, rtol=0, atol=1e-6)
    alpha, sigma, _, _ = path_coefficients(path, t)
    torch.testing.assert_close(sigma / alpha, s, rtol=1e-4, atol=0)
    # the distribution: P(t <= tau) = Phi(log(sigma/alpha at tau))
    for tau in (0.1, 0.3, 0.5, 0.7, 0.9):
        a, g, _, _ = path_coefficients(path, torch.tensor(tau, dtype=torch.float64))
        cdf = 0.5 * (1 + math.erf(math.log(float(g / a)) / math.sqrt(2)))
        assert (t <= tau).double().mean().item() == pytest.approx(cdf, abs=0.005)
