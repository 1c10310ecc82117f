"""The Mamba step's fp32 softplus of delta (ops/csrc/step/softplus.h) against torch's: the error bound
its header states, over a dense grid and the special values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridssm.ops.step import fused_step_available, step_extension

pytestmark = pytest.mark.skipif(not fused_step_available(),
                                reason="the fused step kernels are not built here")

TINY = torch.finfo(torch.float32).tiny
DENORM_MIN = 2.0 ** -149


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in fp32 steps between finite, non-negative a and b (softplus is >= 0)."""
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs()


def _grid() -> torch.Tensor:
    """-110..30 densely (both sides of the threshold 20, the denormal results below -87.3, exp's
    underflow below -103.9), every float in [-1, 1] at a 2^-18 step, and the denormal inputs."""
    return torch.cat([
        torch.linspace(-110.0, 30.0, 4_000_001),
        torch.linspace(-1.0, 1.0, 2 ** 19 + 1),
        torch.linspace(19.0, 21.0, 200_001),
        torch.tensor([20.0, math.nextafter(20.0, 0.0), math.nextafter(20.0, 30.0), DENORM_MIN, -DENORM_MIN,
                      1e-40, -1e-40, TINY, -TINY, 0.0, -0.0, 88.7, -87.3, -103.9, -104.0]),
    ]).float()


def test_softplus_within_3_ulp_of_torch_on_a_dense_grid():
    x = _grid()
    ours, ref = step_extension().softplus_f32(x), F.softplus(x)
    normal = ref >= TINY
    worst = _ulps(ours[normal], ref[normal]).max().item()
    assert worst <= 3, f"softplus_f32 is {worst} ULP from torch's"
    # below the normal range (torch's result a denormal or 0): within one denormal step of the exact
    # value, as torch's own (so the two differ by two steps at most)
    exact = torch.log1p(torch.exp(x[~normal].double())).float()
    assert (ours[~normal] - exact).abs().max().item() <= DENORM_MIN
    assert (ours[~normal] - ref[~normal]).abs().max().item() <= 2 * DENORM_MIN
    assert (ours >= 0).all()
    # above the threshold the value is x itself, as torch's
    above = x > 20
    assert torch.equal(ours[above], x[above])


def test_softplus_special_values_as_torch():
    x = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 0.0, 1e4, -1e4])
    ours, ref = step_extension().softplus_f32(x), F.softplus(x)
    assert torch.equal(ours.isnan(), ref.isnan())
    assert torch.equal(ours[~ref.isnan()], ref[~ref.isnan()])


def test_softplus_tail_of_a_row_off_the_simd_grid():
    """Lengths that end in a partial vector give the same values as the full vectors."""
    x = torch.linspace(-30.0, 30.0, 8 * 7)
    full = step_extension().softplus_f32(x)
    for n in (1, 5, 13, 55):
        assert torch.equal(step_extension().softplus_f32(x[:n]), full[:n])
