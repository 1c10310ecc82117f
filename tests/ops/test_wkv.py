"""The RWKV-6 WKV op: the chunked form and the fused kernel against the loop (values, final state,
every gradient), extreme decays, fp64 gradchecks, padding identity steps, threads and torch.compile."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from hybridssm.ops import use_kernels
from hybridssm.ops.wkv import FUSED_CHECKPOINT, wkv6, wkv6_chunked, wkv6_fused, wkv6_ref

FAST = ["torch", "fused"]
NAMES = ("r", "k", "v", "w", "u", "state")


def _inputs(B, T, H, K, *, V=None, dtype=torch.float32, log_decay_scale=1.0, seed=0):
    V = K if V is None else V
    g = torch.Generator().manual_seed(seed)
    r, k = (torch.randn(B, T, H, K, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    w = -torch.exp(torch.randn(B, T, H, K, generator=g, dtype=dtype) * log_decay_scale)
    u = torch.randn(H, K, generator=g, dtype=dtype)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (r, k, v, w, u, s0)]


def _run(backend, inputs, chunk):
    with use_kernels(backend):
        o, s = wkv6(*inputs, chunk)
    g_o, g_s = torch.randn(o.shape, dtype=o.dtype), torch.randn(s.shape, dtype=s.dtype)
    grads = torch.autograd.grad((o * g_o).sum() + (s * g_s).sum(), inputs)
    return o, s, grads


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("T", [1, 7, 63, 200])
def test_fast_equals_ref(backend, T):
    # K = 4, V = 4: narrower than a SIMD vector (tail lanes); T = 63 / 200 cross the fused
    # kernel's checkpoints (every 32 steps) at and off a boundary.
    inputs = _inputs(2, T, 2, 4, seed=T)
    torch.manual_seed(1)
    o_r, s_r, g_r = _run("ref", inputs, 16)
    torch.manual_seed(1)
    o_f, s_f, g_f = _run(backend, inputs, 16)
    assert_close(o_f, o_r, msg="output")
    assert_close(s_f, s_r, msg="final state")
    for name, a, e in zip(NAMES, g_f, g_r):
        assert_close(a, e, msg=f"grad {name}")


@pytest.mark.parametrize("K,V", [(64, 64), (5, 19), (3, 8)])
def test_fused_head_sizes(K, V):
    """RWKV-6's 64-wide heads (full vectors), and K != V with a V that is not a SIMD multiple."""
    inputs = _inputs(2, FUSED_CHECKPOINT + 3, 3, K, V=V, seed=K)
    torch.manual_seed(1)
    o_r, s_r, g_r = _run("ref", inputs, 16)
    torch.manual_seed(1)
    o_f, s_f, g_f = _run("fused", inputs, 16)
    assert_close(o_f, o_r, msg="output")
    assert_close(s_f, s_r, msg="final state")
    for name, a, e in zip(NAMES, g_f, g_r):
        assert_close(a, e, msg=f"grad {name}")


def test_fused_output_or_state_alone():
    """Backward from the output alone and from the final state alone (the other grad is None)."""
    inputs = _inputs(1, 40, 2, 4)
    for pick in (0, 1):
        with use_kernels("ref"):
            e = torch.autograd.grad(wkv6(*inputs)[pick].square().sum(), inputs, materialize_grads=True)
        with use_kernels("fused"):
            a = torch.autograd.grad(wkv6(*inputs)[pick].square().sum(), inputs, materialize_grads=True)
        for name, x, y in zip(NAMES, a, e):
            assert_close(x, y, msg=f"{'output' if pick == 0 else 'state'}: grad {name}")


def test_fused_no_grad_and_bf16():
    """Under no_grad no checkpoints are kept; bf16 inputs run in fp32 and match the loop's fp32."""
    r, k, v, w, u, s0 = (t.detach() for t in _inputs(2, 37, 2, 8))
    with torch.no_grad(), use_kernels("fused"):
        o, s = wkv6(r, k, v, w, u, s0)
    o_r, s_r = wkv6_ref(r, k, v, w, u, s0)
    assert_close(o, o_r)
    assert_close(s, s_r)
    bf = [t.to(torch.bfloat16) for t in (r, k, v, w, u)]
    with use_kernels("fused"):
        o_b, s_b = wkv6(*bf, s0)
    o_e, s_e = wkv6_ref(*bf, s0)
    assert o_b.dtype == torch.float32 and s_b.dtype == torch.float32
    assert_close(o_b, o_e)
    assert_close(s_b, s_e)


def test_fused_multithreaded_equals_ref():
    """(batch, head) units split across threads (the rest of the suite runs on one thread)."""
    inputs = _inputs(3, 45, 3, 8, seed=4)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(1)
        o_f, s_f, g_f = _run("fused", inputs, 16)
    finally:
        torch.set_num_threads(n)
    torch.manual_seed(1)
    o_r, s_r, g_r = _run("ref", inputs, 16)
    assert_close(o_f, o_r)
    assert_close(s_f, s_r)
    for name, a, e in zip(NAMES, g_f, g_r):
        assert_close(a, e, msg=f"grad {name}")


def test_fused_compiles_fullgraph():
    inputs = [t.detach().requires_grad_() for t in _inputs(1, 9, 2, 4)]
    with use_kernels("fused"):
        compiled = torch.compile(wkv6_fused, backend="aot_eager", fullgraph=True)
        o, s = compiled(*inputs)
    o_r, s_r = wkv6_ref(*inputs)
    assert_close(o, o_r)
    assert_close(s, s_r)
    g = torch.autograd.grad(o.sum() + s.sum(), inputs)
    g_r = torch.autograd.grad(o_r.sum() + s_r.sum(), inputs)
    for name, a, e in zip(NAMES, g, g_r):
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
    for backend in FAST:
        torch.manual_seed(1)
        o_f, s_f, g_f = _run(backend, inputs, 16)
        assert torch.isfinite(o_f).all() and torch.isfinite(s_f).all()
        assert_close(o_f, o_r, msg=backend)
        assert_close(s_f, s_r, msg=backend)
        for name, a, e in zip(NAMES, g_f, g_r):
            assert torch.isfinite(a).all()
            assert_close(a, e, msg=f"{backend} grad {name}")


def test_gradcheck_fp64():
    inputs = _inputs(1, 5, 1, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: wkv6_chunked(*a, chunk_size=2), inputs)


def test_gradcheck_fp64_fused():
    # T crosses a checkpoint; K != V
    inputs = _inputs(1, FUSED_CHECKPOINT + 2, 2, 2, V=3, dtype=torch.float64)
    assert torch.autograd.gradcheck(wkv6_fused, inputs)


def test_identity_steps_keep_state():
    """w = 0 and k = 0 leave the state unchanged (how padded steps are made identities)."""
    r, k, v, w, u, s0 = (t.detach() for t in _inputs(1, 6, 2, 4))
    k, w = k.clone(), w.clone()
    k[:, 2:], w[:, 2:] = 0.0, 0.0
    _, s_two = wkv6_ref(r[:, :2], k[:, :2], v[:, :2], w[:, :2], u, s0)
    for fast in (lambda *a: wkv6_chunked(*a, chunk_size=4), wkv6_fused):
        _, s_full = fast(r, k, v, w, u, s0)
        assert_close(s_full, s_two)
