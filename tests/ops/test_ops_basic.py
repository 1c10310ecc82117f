"""ops.conv and ops.linear_rnn: fast forms equal their references (values, states, gradients)."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from hybridssm.ops._kernels import use_kernels
from hybridssm.ops.conv import causal_conv1d, causal_conv1d_ref
from hybridssm.ops.linear_rnn import linear_rnn, linear_rnn_ref

TS = [1, 7, 63, 200]


def _grads(fn, *tensors):
    out, state = fn(*tensors)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + (state * 0.37).sum()
    return torch.autograd.grad(loss, [t for t in tensors if t is not None and t.requires_grad])


def _conv_inputs(T, B=2, C=3, K=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(T)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(B, T, C), mk(C, K), mk(C), mk(B, C, K - 1)


@pytest.mark.parametrize("T", TS)
def test_conv_fast_equals_ref(T):
    x, w, b, s = _conv_inputs(T)
    y_ref, s_ref = causal_conv1d_ref(x, w, b, s)
    with use_kernels("torch"):
        y, st = causal_conv1d(x, w, b, s)
    assert_close(y, y_ref)
    assert_close(st, s_ref)
    for g, g_ref in zip(_grads(causal_conv1d, x, w, b, s), _grads(causal_conv1d_ref, x, w, b, s)):
        assert_close(g, g_ref)


def test_conv_matches_textbook_and_state_is_last_inputs():
    x, w, b, s = _conv_inputs(5, K=3)
    y, st = causal_conv1d(x, w, b, s)
    xs = torch.cat([s.transpose(1, 2), x], 1)  # [B, K-1+T, C]
    for t in range(5):
        expect = (xs[:, t : t + 3] * w.T).sum(1) + b
        assert_close(y[:, t], expect)
    assert_close(st, x[:, -2:].transpose(1, 2))


def test_conv_lengths_state_and_kernel_one():
    x, w, b, s = _conv_inputs(6, K=3)
    lengths = torch.tensor([6, 2])
    _, st = causal_conv1d(x, w, b, s, lengths)
    _, alone = causal_conv1d(x[1:, :2], w, b, s[1:])
    assert_close(st[1:], alone)
    # lengths = 1 with K - 1 = 2: the state mixes the old state and the first input
    _, st1 = causal_conv1d(x, w, b, s, torch.tensor([1, 1]))
    assert_close(st1[:, :, 0], s[:, :, 1])
    assert_close(st1[:, :, 1], x[:, 0])
    x1, w1, b1, s1 = _conv_inputs(4, K=1)
    y1, st_1 = causal_conv1d(x1, w1, b1, s1)
    assert st_1.shape == (2, 3, 0)
    assert_close(y1, x1 * w1[:, 0] + b1)


def test_conv_gradcheck_fp64():
    x, w, b, s = (t.detach().double().requires_grad_() for t in _conv_inputs(5, B=1, C=2, K=3))
    with use_kernels("torch"):
        assert torch.autograd.gradcheck(lambda *a: causal_conv1d(*a), (x, w, b, s))


def _rnn_inputs(T, B=2, D=5, dtype=torch.float32, strong=False):
    g = torch.Generator().manual_seed(T + 1)
    a = torch.rand(B, T, D, generator=g, dtype=dtype)
    if strong:
        a = a * 1e-3  # decays near zero: products underflow, never blow up
    b = torch.randn(B, T, D, generator=g, dtype=dtype)
    h0 = torch.randn(B, D, generator=g, dtype=dtype)
    return a.requires_grad_(), b.requires_grad_(), h0.requires_grad_()


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("strong", [False, True])
def test_linear_rnn_fast_equals_ref(T, strong):
    a, b, h0 = _rnn_inputs(T, strong=strong)
    h_ref, last_ref = linear_rnn_ref(a, b, h0)
    with use_kernels("torch"):
        h, last = linear_rnn(a, b, h0)
        grads = _grads(linear_rnn, a, b, h0)
    assert_close(h, h_ref)
    assert_close(last, last_ref)
    for g, g_ref in zip(grads, _grads(linear_rnn_ref, a, b, h0)):
        assert_close(g, g_ref)


def test_linear_rnn_textbook_and_identity_steps():
    a, b, h0 = (t.detach() for t in _rnn_inputs(4))
    h = h0
    for t in range(4):
        h = a[:, t] * h + b[:, t]
    assert_close(linear_rnn(a, b, h0)[1], h)
    # identity steps (a = 1, b = 0) carry the state through untouched
    a2 = torch.cat([a, torch.ones_like(a)], 1)
    b2 = torch.cat([b, torch.zeros_like(b)], 1)
    assert_close(linear_rnn(a2, b2, h0)[1], h)


def test_linear_rnn_gradcheck_fp64():
    a, b, h0 = (t.detach().double().requires_grad_() for t in _rnn_inputs(6, B=1, D=2))
    with use_kernels("torch"):
        assert torch.autograd.gradcheck(lambda *x: linear_rnn(*x), (a, b, h0))


def test_linear_rnn_accumulates_in_fp32_for_bf16_inputs():
    a, b, h0 = (t.detach() for t in _rnn_inputs(9))
    h, last = linear_rnn(a.bfloat16(), b.bfloat16(), h0)
    assert h.dtype == torch.float32 and last.dtype == torch.float32
