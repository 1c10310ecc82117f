"""The GRU recurrence op: PyTorch's RNN op and the fused kernel against the step-by-step equations
(values and every gradient), fp64 gradcheck, no_grad, bf16, threads and torch.compile."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from hybridssm.ops import use_kernels
from hybridssm.ops.gru import gru, gru_fused, gru_ref

NAMES = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh")


def _inputs(B, T, D, H, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()

    s = H**-0.5
    w = [r(3 * H, D, scale=s), r(3 * H, H, scale=s), r(3 * H, scale=s), r(3 * H, scale=s)]
    return [r(B, T, D), r(B, H), *w]


def _run(backend, inputs):
    with use_kernels(backend):
        y = gru(*inputs)
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    return y, torch.autograd.grad((y * wy).sum(), inputs)


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("T", [1, 7, 63, 200])
def test_fast_equals_ref(backend, T):
    # H = 13: not a SIMD multiple (tail lanes); D != H
    inputs = _inputs(3, T, 10, 13, seed=T)
    y, grads = _run(backend, inputs)
    y_ref, grads_ref = _run("ref", inputs)
    assert_close(y, y_ref, msg=f"{backend} y")
    for name, a, e in zip(NAMES, grads, grads_ref):
        assert_close(a, e, msg=f"{backend} grad {name}")


def test_fused_equals_nn_gru():
    torch.manual_seed(0)
    ref = torch.nn.GRU(12, 24, batch_first=True)
    x, h0 = torch.randn(2, 30, 12), torch.randn(1, 2, 24)
    y_ref, _ = ref(x, h0)
    with use_kernels("fused"):
        y = gru(x, h0[0], ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0, ref.bias_hh_l0)
    assert_close(y, y_ref)


def test_gradcheck_fp64_fused():
    inputs = _inputs(2, 5, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(gru_fused, inputs)


def test_fused_no_grad_and_bf16():
    inputs = [t.detach() for t in _inputs(2, 9, 6, 8)]
    with torch.no_grad(), use_kernels("fused"):
        y = gru(*inputs)
    assert_close(y, gru_ref(*inputs))
    bf = [t.to(torch.bfloat16) for t in inputs]
    with use_kernels("fused"):
        y_b = gru(*bf)
    assert y_b.dtype == torch.float32  # the recurrence's precision, as the reference
    assert_close(y_b, gru_ref(*bf))


def test_fused_multithreaded_equals_ref():
    inputs = _inputs(4, 40, 16, 32, seed=3)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, grads = _run("fused", inputs)
    finally:
        torch.set_num_threads(n)
    y_ref, grads_ref = _run("ref", inputs)
    assert_close(y, y_ref)
    for name, a, e in zip(NAMES, grads, grads_ref):
        assert_close(a, e, msg=f"grad {name}")


def test_fused_compiles_fullgraph():
    inputs = [t.detach().requires_grad_() for t in _inputs(2, 6, 4, 8)]
    compiled = torch.compile(gru_fused, backend="aot_eager", fullgraph=True)
    y = compiled(*inputs)
    y_ref = gru_ref(*inputs)
    assert_close(y, y_ref)
    g = torch.autograd.grad(y.square().sum(), inputs)
    g_ref = torch.autograd.grad(y_ref.square().sum(), inputs)
    for name, a, e in zip(NAMES, g, g_ref):
        assert_close(a, e, msg=f"grad {name}")
