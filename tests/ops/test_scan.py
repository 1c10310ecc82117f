"""Selective scan (Mamba-1): every fast form against the reference loop, fp64 gradchecks, the fused
step against its eager twin, the build-failure fallback, and torch.compile through the custom ops."""

from __future__ import annotations

import warnings

import pytest
import torch

from helpers import assert_close
from hybridssm.ops import _kernels, use_kernels
from hybridssm.ops import scan as scan_mod
from hybridssm.ops.scan import selective_scan, selective_scan_ref

FAST = ["torch", "fused"]
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state"]


def _inputs(Bsz, T, Dn, N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=dtype) * scale).requires_grad_(True)

    return dict(
        u=r(Bsz, T, Dn),
        delta=r(Bsz, T, Dn, scale=0.5),
        A=(-torch.exp(torch.randn(Dn, N, generator=g, dtype=dtype))).requires_grad_(True),
        B=r(Bsz, T, N),
        C=r(Bsz, T, N),
        D=r(Dn),
        z=r(Bsz, T, Dn),
        delta_bias=r(Dn, scale=0.5),
        state=r(Bsz, Dn, N),
    )


def _run(backend, inp, softplus=True):
    with use_kernels(backend):
        y, h = selective_scan(**inp, delta_softplus=softplus)
    g = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    wh = torch.randn(h.shape, generator=g, dtype=h.dtype)
    leaves = [inp[k] for k in NAMES]
    grads = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), leaves)
    return y, h, grads


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("T", [1, 7, 63, 200])
@pytest.mark.parametrize("N", [16, 5])
def test_fast_equals_ref(backend, T, N):
    # Dn = 13 is not a multiple of the SIMD width (tail lanes); N = 16 and 5 take both kernel paths.
    inp = _inputs(2, T, 13, N)
    y, h, grads = _run(backend, inp)
    y_ref, h_ref, grads_ref = _run("ref", inp)
    assert_close(y, y_ref, msg=f"{backend} y")
    assert_close(h, h_ref, msg=f"{backend} final state")
    for name, a, b in zip(NAMES, grads, grads_ref):
        assert_close(a, b, msg=f"{backend} grad {name}")


@pytest.mark.parametrize("backend", FAST)
def test_optional_inputs_and_no_grad(backend):
    """Without D, z, delta_bias, softplus and state; and under no_grad (no checkpoints saved)."""
    inp = _inputs(3, 40, 9, 16)
    kw = dict(u=inp["u"], delta=inp["delta"].abs(), A=inp["A"], B=inp["B"], C=inp["C"])
    with torch.no_grad():
        ref = selective_scan_ref(**kw)
        with use_kernels(backend):
            out = selective_scan(**kw)
    for a, b in zip(out, ref):
        assert_close(a, b)


def test_zero_delta_is_identity_step():
    inp = _inputs(2, 6, 8, 16)
    delta = torch.zeros(2, 6, 8)
    for backend in ["ref", *FAST]:
        with use_kernels(backend), torch.no_grad():
            _, h = selective_scan(inp["u"], delta, inp["A"], inp["B"], inp["C"], state=inp["state"])
        assert_close(h, inp["state"], msg=backend)


@pytest.mark.parametrize("backend", FAST)
def test_gradcheck_fp64(backend, monkeypatch):
    # T = 35 crosses the fused checkpoint interval (32); the torch form gets short chunks instead.
    T = 35 if backend == "fused" else 9
    monkeypatch.setattr(scan_mod, "TORCH_CHUNK", 4)
    inp = _inputs(1, T, 2, 2, dtype=torch.float64)

    def f(*args):
        with use_kernels(backend):
            return selective_scan(**dict(zip(NAMES, args)), delta_softplus=True)

    assert torch.autograd.gradcheck(f, tuple(inp[k] for k in NAMES))


def test_build_failure_falls_back_with_one_warning(monkeypatch):
    entry = _kernels._OPS["selective_scan"]

    def broken(device_type):
        raise RuntimeError("simulated compiler error")

    monkeypatch.setattr(entry, "fused_probe", broken)
    monkeypatch.setattr(entry, "fused_status", {})
    monkeypatch.setattr(_kernels, "_WARNED", set())
    inp = _inputs(1, 5, 4, 16)
    with warnings.catch_warnings(record=True) as caught, use_kernels("auto"), torch.no_grad():
        warnings.simplefilter("always")
        y, h = selective_scan(**{k: inp[k] for k in ("u", "delta", "A", "B", "C")})
        selective_scan(**{k: inp[k] for k in ("u", "delta", "A", "B", "C")})
    msgs = [str(w.message) for w in caught if "selective_scan" in str(w.message)]
    assert len(msgs) == 1 and "simulated compiler error" in msgs[0]
    with use_kernels("auto"):
        assert _kernels.kernels()["selective_scan"]["backend"] == "torch"
    with use_kernels("fused"), pytest.raises(RuntimeError, match="unavailable"):
        selective_scan(**{k: inp[k] for k in ("u", "delta", "A", "B", "C")})
    ref = selective_scan_ref(**{k: inp[k] for k in ("u", "delta", "A", "B", "C")})
    assert_close(y, ref[0])


def test_compile_fullgraph_through_fused_ops():
    inp = _inputs(2, 37, 8, 16)

    def f(u, delta, A, B, C, D, z, delta_bias, state):
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, True, state)

    args = tuple(inp[k] for k in NAMES)
    with use_kernels("fused"):
        eager = f(*args)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(compiled, eager):
        assert_close(a, b)
    ge = torch.autograd.grad(sum(o.sum() for o in eager), args)
    gc = torch.autograd.grad(sum(o.sum() for o in compiled), args)
    for name, a, b in zip(NAMES, gc, ge):
        assert_close(a, b, msg=name)
