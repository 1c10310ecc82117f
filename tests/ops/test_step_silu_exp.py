"""The steps' fp32 SiLU and exp (ops/csrc/step/silu.h, aten_exp.h: ATen's formula with Sleef's exp
written out) bit for bit against torch.nn.functional.silu and ATen's vectorised exp (the library
call the extension was built against; torch.exp itself may take MKL's), on the capability the
extension was built for: every float exponent, both signs, denormals, +-0, +-inf and NaN, and every
tail length."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hybridssm.ops.step import fused_step_available, step_extension

pytestmark = pytest.mark.skipif(not fused_step_available(),
                                reason="the fused step kernels are not built here")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _vectorised_exp(x: torch.Tensor) -> torch.Tensor:
    return step_extension().exp_f32(x, library=True)


FUNCTIONS = {"silu_f32": F.silu, "exp_f32": _vectorised_exp}


def _reference(name: str, x: torch.Tensor) -> torch.Tensor:
    """The library's value, every element through a vectorised loop: ATen runs a tail shorter than
    two vectors through the scalar formula (std::exp), so x is padded to a multiple of 16."""
    pad = (-x.numel()) % 16
    return FUNCTIONS[name](torch.cat([x, torch.zeros(pad)]))[: x.numel()]


def _assert_bitwise(x: torch.Tensor, name: str) -> None:
    ours = getattr(step_extension(), name)(x)
    ref = _reference(name, x)
    same = (_bits(ours) == _bits(ref)) | (ours.isnan() & ref.isnan())
    if not same.all():
        bad = (~same).nonzero()[0].item()
        raise AssertionError(f"{name}({x[bad].item()!r}): {ours[bad].item()!r} against torch's "
                             f"{ref[bad].item()!r} ({(~same).sum().item()} values differ)")


each_function = pytest.mark.parametrize("name", sorted(FUNCTIONS))


@each_function
def test_bitwise_over_every_exponent(name):
    """Random mantissas at every exponent (denormals included), both signs."""
    gen = torch.Generator().manual_seed(0)
    exponent = torch.arange(0, 255, dtype=torch.int32).repeat_interleave(4096)  # biased exponents 0..254
    mantissa = torch.randint(0, 1 << 23, exponent.shape, dtype=torch.int32, generator=gen)
    pos = ((exponent << 23) | mantissa).view(torch.float32)
    _assert_bitwise(torch.cat([pos, -pos]), name)


@each_function
def test_bitwise_dense_over_the_working_range(name):
    """Every 64th float in [-120, 120]: the range the conv and gate values take, and the exp's
    thresholds (-104, 100 of -x, 88.7 where exp overflows)."""
    lo = torch.tensor([0.0], dtype=torch.float32).view(torch.int32).item()
    hi = torch.tensor([120.0], dtype=torch.float32).view(torch.int32).item()
    pos = torch.arange(lo, hi, 64, dtype=torch.int32).view(torch.float32)
    _assert_bitwise(torch.cat([pos, -pos]), name)
    edges = torch.tensor([88.0, 88.72, 88.73, 89.0, 99.99, 100.0, 100.01, 103.97, 104.0, 104.01, 150.0])
    _assert_bitwise(torch.cat([edges, -edges, torch.nextafter(edges, torch.zeros(()))]), name)


@each_function
def test_bitwise_special_values(name):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([0.0, -0.0, inf, -inf, nan, -nan, 1e-45, -1e-45, 1.1754942e-38, -1.1754942e-38,
                      3.4028235e38, -3.4028235e38, 1.0, -1.0])
    _assert_bitwise(x, name)
    ours = getattr(step_extension(), name)(x)
    assert torch.equal(ours.signbit()[:2], _reference(name, x).signbit()[:2])  # -0 as torch's


@each_function
def test_every_length_as_the_whole(name):
    """The lockstep chunks (4 vectors) and the partial tail give one value per input."""
    x = torch.linspace(-30, 30, 77)
    full = getattr(step_extension(), name)(x)
    for n in range(1, len(x)):
        assert torch.equal(getattr(step_extension(), name)(x[:n]), full[:n])


@each_function
def test_rejects_other_dtypes(name):
    with pytest.raises(RuntimeError, match=f"{name}: x must be float32"):
        getattr(step_extension(), name)(torch.ones(4, dtype=torch.float64))
