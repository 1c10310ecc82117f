"""ops.conv_silu and ops.gated_norm (the Mamba-2 mixer's fused element-wise pieces) and the kernels'
sigmoid: every fast form against its reference on values, states and all gradients; fp64
gradcheck; strided inputs; dtype fallbacks. The SSD kernel is tested in test_ssd.py."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from hybridssm.ops._kernels import current_backend, resolve, use_kernels
from hybridssm.ops.conv_silu import causal_conv1d_silu, causal_conv1d_silu_fused
from hybridssm.ops.gated_norm import gated_rmsnorm, gated_rmsnorm_fused, gated_rmsnorm_ref
from hybridssm.ops.mamba2_fused import ext

FAST = ["torch", "fused"]


def _conv_inputs(Bsz, T, C, K, *, dtype=torch.float32, extra=5, seed=0):
    """``x`` as a column slice of a wider tensor (the mixer's in_proj split), a non-zero state."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(Bsz, T, C + extra, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(C, K, generator=g, dtype=dtype) * 0.5).requires_grad_()
    bias = torch.randn(C, generator=g, dtype=dtype).requires_grad_()
    state = torch.randn(Bsz, C, K - 1, generator=g, dtype=dtype).requires_grad_()
    return wide, weight, bias, state


def _conv_run(backend, wide, weight, bias, state, lengths, extra=5):
    x = wide[..., 2 : wide.shape[-1] - extra + 2]
    with use_kernels(backend):
        y, final = causal_conv1d_silu(x, weight, bias, state, lengths)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    gf = torch.randn(final.shape, generator=torch.Generator().manual_seed(8), dtype=y.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (final * gf).sum(), (wide, weight, bias, state))
    return (y, final, *grads)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("T", [1, 7, 63, 200])
@pytest.mark.parametrize("C,K", [(21, 4), (8, 3), (5, 1)])
def test_conv_silu_matches_ref(backend, T, C, K):
    inputs = _conv_inputs(3, T, C, K, seed=T + C)
    lengths = torch.tensor([T, max(1, T // 2), max(1, T - 3)])
    for lens in (None, lengths):
        expected = _conv_run("ref", *inputs, lens)
        actual = _conv_run(backend, *inputs, lens)
        for name, a, e in zip(["y", "final state", "dx", "dweight", "dbias", "dstate"], actual, expected):
            assert_close(a, e, msg=f"{name} (lengths={lens})")


@pytest.mark.parametrize("T,K", [(1, 4), (6, 4), (9, 2), (70, 3)])
def test_conv_silu_gradcheck_fp64(T, K):
    # T = 70 crosses the backward's 64-step blocks; a strided x
    wide, weight, bias, state = _conv_inputs(2, T, 6, K, dtype=torch.float64, extra=3)

    def fn(wide, weight, bias, state):
        return causal_conv1d_silu_fused(wide[..., 1:7], weight, bias, state, torch.tensor([T, max(1, T - 2)]))

    assert torch.autograd.gradcheck(fn, (wide, weight, bias, state), eps=1e-6, atol=1e-7)


def test_conv_silu_other_dtypes_take_the_torch_form():
    wide, weight, bias, state = _conv_inputs(2, 9, 8, 4)
    x = wide.detach().to(torch.bfloat16)[..., :8]
    y, final = causal_conv1d_silu_fused(x, weight, bias, state.to(torch.bfloat16))
    with use_kernels("torch"):
        y_t, final_t = causal_conv1d_silu(x, weight, bias, state.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16
    assert torch.equal(y, y_t) and torch.equal(final, final_t)


def _norm_inputs(shape, E, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(*shape, E, generator=g, dtype=dtype).requires_grad_()
    zw = torch.randn(*shape, E + 6, generator=g, dtype=dtype).requires_grad_()  # z = a column slice
    w = (torch.rand(E, generator=g, dtype=dtype) + 0.5).requires_grad_()
    return y, zw, w


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(
    "shape,E,groups", [((2, 7), 12, 3), ((1, 1), 5, 1), ((3, 63), 64, 2), ((2, 200), 24, 1)]
)
def test_gated_rmsnorm_matches_ref(backend, shape, E, groups):
    y, zw, w = _norm_inputs(shape, E, seed=E)
    go = torch.randn(*shape, E, generator=torch.Generator().manual_seed(1))
    results = []
    for b in ("ref", backend):
        with use_kernels(b):
            out = gated_rmsnorm(y, zw[..., 4 : 4 + E], w, groups, 1e-5)
        results.append((out, *torch.autograd.grad((out * go).sum(), (y, zw, w))))
    for name, a, e in zip(["out", "dy", "dz", "dweight"], results[1], results[0]):
        assert_close(a, e, msg=name)


@pytest.mark.parametrize("shape,E,groups", [((2, 3), 6, 2), ((1, 4), 5, 1)])
def test_gated_rmsnorm_gradcheck_fp64(shape, E, groups):
    y, zw, w = _norm_inputs(shape, E, dtype=torch.float64)

    def fn(y, zw, w):
        return gated_rmsnorm_fused(y, zw[..., 1 : 1 + E], w, groups, 1e-5)

    assert torch.autograd.gradcheck(fn, (y, zw, w), eps=1e-6, atol=1e-7)


def test_gated_rmsnorm_fallbacks():
    """Not 3-D, or bf16 inputs with a bf16 weight: the reference form (identical results)."""
    y, zw, w = _norm_inputs((2, 3, 4), 8)
    z = zw[..., :8]
    assert torch.equal(gated_rmsnorm_fused(y, z, w, 2, 1e-5), gated_rmsnorm_ref(y, z, w, 2, 1e-5))
    yb, zb, wb = y[0].bfloat16(), z[0].bfloat16(), w.bfloat16()
    assert torch.equal(gated_rmsnorm_fused(yb, zb, wb, 2, 1e-5), gated_rmsnorm_ref(yb, zb, wb, 2, 1e-5))


def test_kernel_sigmoid_is_accurate():
    """The kernels' inline expf: within ~1.5e-7 relative of the true sigmoid, over the whole range."""
    x = torch.linspace(-60, 60, 100_003)
    expected = torch.sigmoid(x.double())
    rel = (ext().sigmoid_test(x).double() - expected).abs() / expected
    assert rel.max().item() < 2.5e-7
    assert torch.isnan(ext().sigmoid_test(torch.tensor([float("nan")]))).all()


def test_auto_picks_the_fused_kernels_on_cpu():
    if current_backend() != "auto":
        pytest.skip("HYBRIDSSM_KERNELS forces a backend")
    for op in ("ssd", "causal_conv1d_silu", "gated_rmsnorm"):
        assert resolve(op, "cpu")[0] == "fused", op
