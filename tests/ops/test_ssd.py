"""ops.ssd: the chunked SSD form and the fused C++ recurrence against the reference loop (values,
final state, every gradient)."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from hybridssm.ops._kernels import use_kernels
from hybridssm.ops.ssd import ssd, ssd_chunked, ssd_fused, ssd_ref

FAST = ["torch", "fused"]  # the chunked form and the C++ recurrence


def _inputs(T, G, *, Bsz=2, H=4, P=5, N=3, dtype=torch.float32, dt_scale=0.5, with_state=True):
    g = torch.Generator().manual_seed(1000 * T + G)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    x = r(Bsz, T, H, P)
    dt = torch.rand(Bsz, T, H, generator=g, dtype=dtype) * dt_scale
    A = -(torch.rand(H, generator=g, dtype=dtype) * 4 + 0.5)
    B, C = r(Bsz, T, G, N), r(Bsz, T, G, N)
    D = r(H)
    state = r(Bsz, H, P, N) if with_state else None
    return [x, dt, A, B, C, D, state]


def _run(backend, inputs, chunk_size):
    x, dt, A, B, C, D, state = inputs
    with use_kernels(backend):
        return ssd(x, dt, A, B, C, D=D, state=state, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("T,chunk_size", [(1, 4), (7, 3), (7, 16), (63, 16), (200, 64), (200, 48)])
@pytest.mark.parametrize("G", [1, 2])
def test_fast_forms_match_ref_values_state_and_grads(backend, T, chunk_size, G):
    inputs = _inputs(T, G)
    leaves = [t.requires_grad_() for t in inputs]
    y_ref, h_ref = _run("ref", inputs, chunk_size)
    y, h = _run(backend, inputs, chunk_size)
    assert_close(y, y_ref, msg="y")
    assert_close(h, h_ref, msg="final state")

    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    names = ["x", "dt", "A", "B", "C", "D", "state"]
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), leaves)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    for name, a, e in zip(names, grads, grads_ref):
        assert_close(a, e, msg=f"grad {name}")


@pytest.mark.parametrize("P,N,G,T", [(64, 16, 1, 70), (11, 16, 2, 33), (8, 24, 1, 40), (3, 5, 3, 65)])
def test_fused_head_and_state_widths(P, N, G, T):
    """The fused kernel's P-vector tails, its N % 8 == 0 register path and its generic-N path."""
    inputs = _inputs(T, G, H=6 if G == 3 else 4, P=P, N=N)
    leaves = [t.requires_grad_() for t in inputs]
    y_ref, h_ref = _run("ref", inputs, 16)
    y, h = _run("fused", inputs, 16)
    assert_close(y, y_ref, msg="y")
    assert_close(h, h_ref, msg="final state")
    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), leaves)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    for name, a, e in zip(["x", "dt", "A", "B", "C", "D", "state"], grads, grads_ref):
        assert_close(a, e, msg=f"grad {name}")


def test_fused_reads_strided_views():
    """x, B, C as column slices of one [B, T, H*P + 2GN] tensor (the mixer's layout): same values and
    gradients as contiguous copies."""
    Bsz, T, H, P, G, N = 2, 37, 4, 6, 2, 5
    g = torch.Generator().manual_seed(3)
    xbc = torch.randn(Bsz, T, H * P + 2 * G * N + 3, generator=g, requires_grad=True)
    dt = torch.rand(Bsz, T, H, generator=g)
    A, D = -torch.rand(H, generator=g) - 0.5, torch.randn(H, generator=g)

    def views(t):
        x, B, C, _ = t.split([H * P, G * N, G * N, 3], dim=-1)
        return x.reshape(Bsz, T, H, P), B.reshape(Bsz, T, G, N), C.reshape(Bsz, T, G, N)

    x, B, C = views(xbc)
    assert not x.is_contiguous()
    y, h = ssd_fused(x, dt, A, B, C, D=D)
    (gv,) = torch.autograd.grad(y.square().sum() + h.sum(), xbc)
    xc, Bc, Cc = (t.detach().contiguous().requires_grad_() for t in (x, B, C))
    y_ref, h_ref = ssd_ref(xc, dt, A, Bc, Cc, D=D)
    grads_ref = torch.autograd.grad(y_ref.square().sum() + h_ref.sum(), (xc, Bc, Cc))
    assert_close(y, y_ref)
    assert_close(h, h_ref)
    for a, e in zip(views(gv), grads_ref):
        assert_close(a, e)


@pytest.mark.parametrize("T", [1, 9])
def test_zero_initial_state_by_default(T):
    inputs = _inputs(T, 2, with_state=False)
    x, dt, A, B, C, D, _ = inputs
    zeros = torch.zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[3])
    y0, h0 = ssd_chunked(x, dt, A, B, C, D=D, state=None, chunk_size=4)
    y1, h1 = ssd_ref(x, dt, A, B, C, D=D, state=zeros)
    assert_close(y0, y1)
    assert_close(h0, h1)


def test_without_D_and_split_sequences():
    """Running [0, a) then [a, T) from the returned state equals the whole sequence."""
    x, dt, A, B, C, _, state = _inputs(50, 2)
    y, h = ssd_chunked(x, dt, A, B, C, state=state, chunk_size=8)
    ya, ha = ssd_chunked(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], state=state, chunk_size=8)
    yb, hb = ssd_chunked(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], state=ha, chunk_size=8)
    assert_close(torch.cat([ya, yb], dim=1), y)
    assert_close(hb, h)


@pytest.mark.parametrize("backend", FAST)
def test_extreme_decay_and_zero_dt(backend):
    """Strong decays underflow to zero exactly as the loop does (no inf/NaN, gradients finite);
    dt = 0 steps leave the state untouched."""
    inputs = _inputs(40, 1, dt_scale=30.0)
    inputs[1][:, 10:15] = 0.0
    leaves = [t.requires_grad_() for t in inputs]
    y_ref, h_ref = _run("ref", inputs, 16)
    y, h = _run(backend, inputs, 16)
    assert_close(y, y_ref)
    assert_close(h, h_ref)
    grads = torch.autograd.grad(y.sum() + h.sum(), leaves)
    grads_ref = torch.autograd.grad(y_ref.sum() + h_ref.sum(), leaves)
    for a, e in zip(grads, grads_ref):
        assert torch.isfinite(a).all()
        assert_close(a, e)


@pytest.mark.parametrize("fn", [ssd_chunked, ssd_fused])
def test_bf16_inputs_accumulate_in_fp32(fn):
    inputs = _inputs(20, 2)
    y32, h32 = fn(*inputs[:5], D=inputs[5], state=inputs[6], chunk_size=8)
    low = [t.to(torch.bfloat16) for t in inputs[:6]] + [inputs[6]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = fn(*low[:5], D=low[5], state=low[6], chunk_size=8)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert_close(y, y32, "bf16")
    assert_close(h, h32, "bf16")


@pytest.mark.parametrize("impl", [ssd_chunked, ssd_fused])
@pytest.mark.parametrize("T,G", [(1, 2), (5, 1), (5, 2), (35, 2)])
def test_gradcheck_fp64(impl, T, G):
    # T = 35 crosses the fused kernel's 32-step checkpoints
    inputs = [t.requires_grad_() for t in _inputs(T, G, Bsz=1, H=2, P=2, N=3, dtype=torch.float64)]

    def fn(*args):
        x, dt, A, B, C, D, state = args
        return impl(x, dt, A, B, C, D=D, state=state, chunk_size=2)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)
