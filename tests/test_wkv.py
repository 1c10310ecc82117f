"""The RWKV-6 WKV op: the chunked form against the loop (values, final state, every gradient)."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from hybridssm.ops import use_kernels
from hybridssm.ops.wkv import wkv6, wkv6_chunked, wkv6_ref


def _inputs(B, T, H, K, *, dtype=torch.float32, log_decay_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(3))
    w = -torch.exp(torch.randn(B, T, H, K, generator=g, dtype=dtype) * log_decay_scale)
    u = torch.randn(H, K, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, K, K, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (r, k, v, w, u, s0)]


def _run(backend, inputs, chunk):
    with use_kernels(backend):
        o, s = wkv6(*inputs, chunk)
    g_o, g_s = torch.randn(o.shape, dtype=o.dtype), torch.randn(s.shape, dtype=s.dtype)
    grads = torch.autograd.grad((o * g_o).sum() + (s * g_s).sum(), inputs)
    return o, s, grads


@pytest.mark.parametrize("T", [1, 7, 63, 200])
def test_chunked_equals_ref(T):
    inputs = _inputs(2, T, 2, 4, seed=T)
    torch.manual_seed(1)
    o_r, s_r, g_r = _run("ref", inputs, 16)
    torch.manual_seed(1)
    o_f, s_f, g_f = _run("torch", inputs, 16)
    assert_close(o_f, o_r, msg="output")
    assert_close(s_f, s_r, msg="final state")
    for name, a, e in zip(("r", "k", "v", "w", "u", "state"), g_f, g_r):
        assert_close(a, e, msg=f"grad {name}")


@pytest.mark.parametrize("chunk", [1, 3, 16, 64])
def test_chunk_sizes_agree(chunk):
    inputs = _inputs(1, 37, 2, 4)
    o_r, s_r = wkv6_ref(*inputs)
    o_f, s_f = wkv6_chunked(*inputs, chunk_size=chunk)
    assert_close(o_f, o_r)
    assert_close(s_f, s_r)


def test_extreme_decays():
    """Decays from e^-20000 to 1 - 1e-9 per step, mixed, stay exact (no under/overflow, no NaN)."""
    B, T, H, K = 2, 50, 2, 4
    inputs = _inputs(B, T, H, K)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        choice = torch.randint(0, 4, (B, T, H, K), generator=g)
        table = torch.tensor([-2.0e4, -30.0, -1e-9, -0.5])
        inputs[3].copy_(table[choice])
    torch.manual_seed(1)
    o_r, s_r, g_r = _run("ref", inputs, 16)
    torch.manual_seed(1)
    o_f, s_f, g_f = _run("torch", inputs, 16)
    assert torch.isfinite(o_f).all() and torch.isfinite(s_f).all()
    assert_close(o_f, o_r)
    assert_close(s_f, s_r)
    for a, e in zip(g_f, g_r):
        assert torch.isfinite(a).all()
        assert_close(a, e)


def test_gradcheck_fp64():
    inputs = _inputs(1, 5, 1, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: wkv6_chunked(*a, chunk_size=2), inputs)


def test_identity_steps_keep_state():
    """w = 0 and k = 0 leave the state unchanged (how padded steps are made identities)."""
    r, k, v, w, u, s0 = (t.detach() for t in _inputs(1, 6, 2, 4))
    k, w = k.clone(), w.clone()
    k[:, 2:], w[:, 2:] = 0.0, 0.0
    _, s_full = wkv6_chunked(r, k, v, w, u, s0, chunk_size=4)
    _, s_two = wkv6_ref(r[:, :2], k[:, :2], v[:, :2], w[:, :2], u, s0)
    assert_close(s_full, s_two)
