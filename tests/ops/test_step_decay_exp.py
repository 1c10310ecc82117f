"""The Mamba step's fp32 decay exp(delta A) (ops/csrc/step/decay_exp.h) against torch.exp: the error
bound its header states, over a dense sweep of the range the update sees, and the special values."""

from __future__ import annotations

import math

import pytest
import torch

from hybridssm.ops.step import fused_step_available, step_extension

pytestmark = pytest.mark.skipif(not fused_step_available(),
                                reason="the fused step kernels are not built here")

FLUSH = 2.0 ** -125  # below this the decay is flushed to 0 (the header)


def _ulp(ref: torch.Tensor) -> torch.Tensor:
    """The fp32 spacing at each value of ref (fp64, positive normal fp32 values)."""
    exponent = torch.frexp(ref.float())[1]
    return torch.ldexp(torch.ones_like(ref), exponent - 24)


def _sweep() -> tuple[torch.Tensor, torch.Tensor]:
    """delta in [1e-4, 20] x A in [-1e3, -1e-3], 3000 log-spaced values each (9e6 pairs)."""
    delta = torch.logspace(-4, math.log10(20.0), 3000)
    rate = torch.logspace(-3, 3, 3000)
    d, a = torch.meshgrid(delta, rate, indexing="ij")
    return d.reshape(-1).float().contiguous(), (-a).reshape(-1).float().contiguous()


def test_decay_within_1_5_ulp_of_the_exact_exp_of_the_fp32_product():
    delta, A = _sweep()
    ours = step_extension().mamba_decay_f32(delta, A).double()
    x = delta * A  # the fp32 product, as the update and torch.exp(delta * A) round it
    exact = torch.exp(x.double())
    normal = exact >= FLUSH
    err = ((ours[normal] - exact[normal]) / _ulp(exact[normal])).abs()
    assert err.max().item() <= 1.5, f"decay is {err.max().item():.3f} ULP from exp(delta A)"
    # torch's own fp32 exp is within 1 ULP of the same value: ours is within 2.5 ULP of torch's
    ref = torch.exp(x).double()
    assert ((ours[normal] - ref[normal]) / _ulp(exact[normal])).abs().max().item() <= 2.5
    # below the flush point the decay is 0, an absolute error under 2^-125; where torch's is 0, ours too
    assert ours[~normal].abs().max().item() <= FLUSH
    assert (ours[~normal] == 0).all()
    assert (ours[torch.exp(x) == 0] == 0).all()


def test_slow_channels_decay_to_the_last_bit():
    """The slow channels (delta A near 0, decay near 1), whose error a stream amplifies by
    1 / (1 - decay): within half an ULP plus rounding of the exact value, and exactly 1 at delta = 0."""
    delta = torch.logspace(-7, -2, 200_001).float()
    A = torch.full_like(delta, -0.5)
    ours = step_extension().mamba_decay_f32(delta, A).double()
    exact = torch.exp((delta * A).double())
    assert ((ours - exact) / _ulp(exact)).abs().max().item() <= 0.6
    assert step_extension().mamba_decay_f32(torch.zeros(9), torch.full((9,), -3.0)).eq(1).all()


def test_decay_special_values():
    delta = torch.tensor([float("nan"), 1.0, float("inf"), 1.0, 0.0, 2.0, 1e-3])
    A = torch.tensor([-1.0, float("nan"), -1.0, -float("inf"), -1.0, -50.0, -1.0])
    ours = step_extension().mamba_decay_f32(delta, A)
    ref = torch.exp(delta * A)
    assert torch.equal(ours.isnan(), ref.isnan())
    assert ours[2].item() == 0.0 and ours[3].item() == 0.0 and ours[4].item() == 1.0
    # every length (the vector's partial tail) gives the same values as the whole
    full = step_extension().mamba_decay_f32(delta, A)
    for n in range(1, len(delta)):
        part = step_extension().mamba_decay_f32(delta[:n], A[:n])
        assert torch.equal(part.nan_to_num(-1), full[:n].nan_to_num(-1))


def test_decay_rejects_other_dtypes_and_shapes():
    with pytest.raises(RuntimeError, match="float32"):
        ones = torch.ones(4, dtype=torch.float64)
        step_extension().mamba_decay_f32(ones, ones)
    with pytest.raises(RuntimeError, match="one shape"):
        step_extension().mamba_decay_f32(torch.ones(4), torch.ones(5))
