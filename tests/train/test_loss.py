"""REPA projection loss against a float64 hand computation; token resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa_cache.train.loss import repa_loss, resample_tokens


def neg_cos_reference(z: torch.Tensor, y: torch.Tensor) -> float:
    """-mean over (b, t) of <z, y> / (|z| |y|), written out in float64 sums."""
    z64 = z.double().numpy().astype(np.float64)
    y64 = y.double().numpy().astype(np.float64)
    B, T, _ = z64.shape
    total = 0.0
    for b in range(B):
        for t in range(T):
            dot = float(np.sum(z64[b, t] * y64[b, t]))
            nz = float(np.sqrt(np.sum(z64[b, t] ** 2)))
            ny = float(np.sqrt(np.sum(y64[b, t] ** 2)))
            total += dot / (nz * ny)
    return -total / (B * T)


def test_tiny_example_by_hand() -> None:
    z = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]])  # (1, 2, 3)
    y = torch.tensor([[[0.0, 2.0, 0.0], [3.0, 3.0, 0.0]]])  # cos 0 and cos 1
    loss, cosines = repa_loss([z], [y])
    assert loss.item() == pytest.approx(-0.5, abs=1e-7)
    assert cosines[0].item() == pytest.approx(0.5, abs=1e-7)


def test_one_teacher_matches_float64_reference() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 7, generator=g)
    y = torch.randn(3, 5, 7, generator=g) + 0.5 * z  # correlated, so the mean cosine is not ~0
    loss, cosines = repa_loss([z], [y])
    ref = neg_cos_reference(z, y)
    assert abs(ref) > 0.1
    assert loss.item() == pytest.approx(ref, abs=1e-6)
    assert cosines[0].item() == pytest.approx(-ref, abs=1e-6)


def test_two_teachers_mean_of_teachers() -> None:
    g = torch.Generator().manual_seed(1)
    z1, y1 = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    z2 = torch.randn(2, 4, 10, generator=g)
    y2 = z2 + 0.3 * torch.randn(2, 4, 10, generator=g)  # strongly aligned teacher
    loss, cosines = repa_loss([z1, z2], [y1, y2])
    r1, r2 = neg_cos_reference(z1, y1), neg_cos_reference(z2, y2)
    assert loss.item() == pytest.approx((r1 + r2) / 2, abs=1e-6)
    assert [c.item() for c in cosines] == pytest.approx([-r1, -r2], abs=1e-6)
    assert cosines[1].item() > 0.8


@pytest.mark.parametrize(
    "dtype, scale",
    [(torch.float16, 1e4), (torch.float16, 1e-4), (torch.bfloat16, 1e6), (torch.bfloat16, 1e-6)],
)
def test_low_precision_extreme_magnitudes_match_fp32(dtype: torch.dtype, scale: float) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 8, 64, generator=g)
    z = (base * scale).to(dtype)
    y = ((base + torch.randn(2, 8, 64, generator=g)) * scale).to(dtype)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss, cosines = repa_loss([z], [y])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = neg_cos_reference(z, y)  # float64 of the very same low-precision values
    assert loss.item() == pytest.approx(ref, abs=1e-5)
    assert cosines[0].item() == pytest.approx(-ref, abs=1e-5)
    fp32_loss, _ = repa_loss([z.float()], [y.float()])
    assert loss.item() == pytest.approx(fp32_loss.item(), abs=1e-6)


def test_fp16_normalize_would_have_failed() -> None:
    """The case above is a real hazard: normalising 1e4-scale fp16 vectors in fp16 loses them."""
    z = torch.full((1, 1, 64), 1e4, dtype=torch.float16)
    naive = (F.normalize(z, dim=-1) * F.normalize(z, dim=-1)).sum(-1)
    # the fp16 norm overflows to inf, so the cosine of a vector with itself comes out wrong
    assert naive.item() != pytest.approx(1.0, abs=1e-2)
    loss, _ = repa_loss([z], [z])
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)


def test_gradient_flows_to_z_only() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loss, cosines = repa_loss([z], [y])
    loss.backward()
    assert y.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert not cosines[0].requires_grad
    # The gradient is the analytic one: d(-cos)/dz = -(y_n - cos * z_n) / |z| / (B*T).
    zn, yn = F.normalize(z.detach(), dim=-1), F.normalize(y.detach(), dim=-1)
    cos = (zn * yn).sum(-1, keepdim=True)
    expected = -(yn - cos * zn) / z.detach().norm(dim=-1, keepdim=True) / 6
    torch.testing.assert_close(z.grad, expected)


def test_token_mismatch_names_both_shapes() -> None:
    message = r"\(2, 64, 8\).*\(2, 256, 8\).*z tokens 64 vs teacher tokens 256"
    with pytest.raises(ValueError, match=message):
        repa_loss([torch.zeros(2, 64, 8)], [torch.zeros(2, 256, 8)])
    with pytest.raises(ValueError, match="2 projector outputs but 1 teacher"):
        repa_loss([torch.zeros(1, 4, 8)] * 2, [torch.zeros(1, 4, 8)])


def _column_ramp(side: int, dim: int = 3) -> torch.Tensor:
    """(1, side*side, dim) tokens, row-major, whose value is the column index."""
    cols = torch.arange(side, dtype=torch.float32).repeat(side)  # (side*side,)
    return cols.reshape(1, -1, 1).expand(1, side * side, dim).contiguous()


def test_resample_upsample_bilinear_by_hand() -> None:
    feats = _column_ramp(2) * 4  # columns [0, 4]
    out = resample_tokens(feats, 4)  # (1, 16, 3)
    assert out.shape == (1, 16, 3)
    grid = out[0, :, 0].reshape(4, 4)  # (rows, cols)
    # align_corners=False: sample points -0.25, 0.25, 0.75, 1.25 (clamped) -> 0, 1, 3, 4
    expected = torch.tensor([0.0, 1.0, 3.0, 4.0]).repeat(4, 1)
    torch.testing.assert_close(grid, expected)


def test_resample_downsample_keeps_ramp_and_antialiases() -> None:
    out = resample_tokens(_column_ramp(16), 8)  # (1, 64, 3)
    grid = out[0, :, 0].reshape(8, 8)
    interior = grid[:, 1:7]  # a symmetric filter keeps a linear ramp away from the borders
    torch.testing.assert_close(interior, (torch.arange(1, 7) * 2 + 0.5).float().repeat(8, 1))
    noise = torch.randn(4, 256, 16, generator=torch.Generator().manual_seed(4))
    smooth = resample_tokens(noise, 4)
    # Without antialiasing each output would average just 2x2 inputs (variance 1/4).
    assert smooth.var().item() < 0.1


def test_resample_identity_dtype_and_non_square() -> None:
    feats = torch.randn(2, 16, 8).half()
    assert resample_tokens(feats, 4) is feats
    assert resample_tokens(feats, 2).dtype == torch.float16
    with pytest.raises(ValueError, match="12 teacher tokens: not a square grid"):
        resample_tokens(torch.zeros(1, 12, 4), 2)
