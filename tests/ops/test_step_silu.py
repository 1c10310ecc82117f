"""The steps' fp32 SiLU (ops/csrc/step/silu.h: ATen's formula with Sleef's exp written out) against
torch.nn.functional.silu, bit for bit, on the capability the extension was built for: every float
exponent, both signs, denormals, +-0, +-inf and NaN, and every tail length."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridssm.ops.step import fused_step_available, step_extension

pytestmark = pytest.mark.skipif(not fused_step_available(),
                                reason="the fused step kernels are not built here")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _assert_bitwise(x: torch.Tensor) -> None:
    ours = step_extension().silu_f32(x)
    ref = F.silu(x)
    same = (_bits(ours) == _bits(ref)) | (ours.isnan() & ref.isnan())
    if not same.all():
        bad = (~same).nonzero()[0].item()
        raise AssertionError(f"silu({x[bad].item()!r}): {ours[bad].item()!r} against torch's {ref[bad].item()!r}"
                             f" ({(~same).sum().item()} values differ)")


def test_silu_bitwise_over_every_exponent():
    """Random mantissas at every exponent (denormals included), both signs."""
    gen = torch.Generator().manual_seed(0)
    exponent = torch.arange(0, 255, dtype=torch.int32).repeat_interleave(4096)  # biased exponents 0..254
    mantissa = torch.randint(0, 1 << 23, exponent.shape, dtype=torch.int32, generator=gen)
    pos = ((exponent << 23) | mantissa).view(torch.float32)
    _assert_bitwise(torch.cat([pos, -pos]))


def test_silu_bitwise_dense_over_the_working_range():
    """Every 64th float in [-120, 120]: the range the conv and gate values take, and the exp's
    thresholds (-104, 100 of -x, 88.7 where exp overflows)."""
    lo = torch.tensor([0.0], dtype=torch.float32).view(torch.int32).item()
    hi = torch.tensor([120.0], dtype=torch.float32).view(torch.int32).item()
    pos = torch.arange(lo, hi, 64, dtype=torch.int32).view(torch.float32)
    _assert_bitwise(torch.cat([pos, -pos]))
    edges = torch.tensor([88.0, 88.72, 88.73, 89.0, 99.99, 100.0, 100.01, 103.97, 104.0, 104.01, 150.0])
    _assert_bitwise(torch.cat([edges, -edges, torch.nextafter(edges, torch.zeros(()))]))


def test_silu_bitwise_special_values():
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, inf, -inf, nan, -nan, 1e-45, -1e-45, 1.1754942e-38, -1.1754942e-38,
                      3.4028235e38, -3.4028235e38, 1.0, -1.0])
    _assert_bitwise(x)
    ours = step_extension().silu_f32(x)
    assert torch.equal(ours.signbit()[:2], F.silu(x).signbit()[:2])  # -0 stays -0, as torch's


def test_silu_every_length_as_the_whole():
    """The lockstep chunks (4 vectors) and the partial tail give one value per input."""
    x = torch.linspace(-30, 30, 77)
    full = step_extension().silu_f32(x)
    for n in range(1, len(x)):
        assert torch.equal(step_extension().silu_f32(x[:n]), full[:n])


def test_silu_rejects_other_dtypes():
    with pytest.raises(RuntimeError, match="float32"):
        step_extension().silu_f32(torch.ones(4, dtype=torch.float64))
