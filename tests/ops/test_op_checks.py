"""Wrong shapes raise, never crash: every op with a wrong batch, time, channel, state, group or kernel
size raises ``ValueError`` naming the argument, the expected and the actual shape, on every backend;
the C++ entry points themselves raise (``TORCH_CHECK``) when called directly with wrong sizes.

The cases run in one subprocess, so that a kernel that corrupts memory fails its case here instead
of ending the test session: a case after a crash has no result and fails with the crash's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _t(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


def _scan(**bad):
    from hybridssm.ops.scan import selective_scan

    a = dict(u=_t(4, 40, 8), delta=_t(4, 40, 8).abs(), A=-_t(8, 16).abs(), B=_t(4, 40, 16), C=_t(4, 40, 16),
             D=_t(8), state=None)
    return selective_scan(**{**a, **bad})


def _ssd(**bad):
    from hybridssm.ops.ssd import ssd

    a = dict(x=_t(2, 10, 4, 3), dt=_t(2, 10, 4).abs(), A=-_t(4).abs(), B=_t(2, 10, 2, 5), C=_t(2, 10, 2, 5),
             D=_t(4), state=_t(2, 4, 3, 5))
    x, dt, A, B, C = (a.pop(k) for k in ("x", "dt", "A", "B", "C"))
    a = {**a, **bad}
    return ssd(a.pop("x", x), a.pop("dt", dt), a.pop("A", A), a.pop("B", B), a.pop("C", C), **a)


def _conv(op, **bad):
    from hybridssm.ops.conv import causal_conv1d
    from hybridssm.ops.conv_silu import causal_conv1d_silu

    fn = {"conv": causal_conv1d, "conv_silu": causal_conv1d_silu}[op]
    a = dict(x=_t(2, 7, 6), weight=_t(6, 4), bias=_t(6), state=_t(2, 6, 3), lengths=None)
    return fn(**{**a, **bad})


def _gnorm(**bad):
    from hybridssm.ops.gated_norm import gated_rmsnorm

    a = dict(y=_t(2, 5, 8), z=_t(2, 5, 8), weight=_t(8), groups=2)
    return gated_rmsnorm(**{**a, **bad})


def _wkv(**bad):
    from hybridssm.ops.wkv import wkv6

    a = dict(r=_t(1, 6, 2, 4), k=_t(1, 6, 2, 4), v=_t(1, 6, 2, 3), w=-_t(1, 6, 2, 4).abs(), u=_t(2, 4),
             state=_t(1, 2, 4, 3))
    return wkv6(**{**a, **bad})


def _gru(**bad):
    from hybridssm.ops.gru import gru

    a = dict(x=_t(2, 5, 3), h0=_t(2, 4), w_ih=_t(12, 3), w_hh=_t(12, 4), b_ih=_t(12), b_hh=_t(12))
    return gru(**{**a, **bad})


def _lrnn(**bad):
    from hybridssm.ops.linear_rnn import linear_rnn

    a = dict(a=_t(2, 5, 3), b=_t(2, 5, 3), h0=_t(2, 3))
    return linear_rnn(**{**a, **bad})


def _delta(**bad):
    from hybridssm.ops.delta_rule import delta_rule

    a = dict(q=_t(1, 6, 2, 4), k=_t(1, 6, 2, 4), v=_t(1, 6, 2, 3), beta=_t(1, 6, 2), g=None, state=None)
    q, k, v, beta = (a.pop(n) for n in ("q", "k", "v", "beta"))
    a = {**a, **bad}
    return delta_rule(a.pop("q", q), a.pop("k", k), a.pop("v", v), a.pop("beta", beta), **a)


# name -> (call, message it must raise with); each runs on every backend
CASES = {
    # the probe's example: a state of batch 1 beside inputs of batch 4
    "selective_scan state batch": (
        lambda: _scan(state=torch.zeros(1, 8, 16)),
        "state must have shape [B, D, N] = [B=4, D=8, N=16], got [1, 8, 16]",
    ),
    "selective_scan B time": (lambda: _scan(B=_t(4, 39, 16)), "B must have shape [B, T, N]"),
    "selective_scan A channels": (lambda: _scan(A=_t(9, 16)), "A must have shape [D, N] = [D=8, N]"),
    "selective_scan C state size": (
        lambda: _scan(C=_t(4, 40, 15)),
        "C must have shape [B, T, N] = [B=4, T=40, N=16]",
    ),
    "selective_scan D": (lambda: _scan(D=_t(7)), "D must have shape [D] = [D=8], got [7]"),
    "selective_scan delta rank": (lambda: _scan(delta=_t(4, 40)), "delta must have shape"),
    "ssd groups": (
        lambda: _ssd(B=_t(2, 10, 3, 5), C=_t(2, 10, 3, 5)),
        "groups of B and C (3) must divide the heads of x (4)",
    ),
    "ssd dt time": (lambda: _ssd(dt=_t(2, 9, 4)), "dt must have shape [B, T, H] = [B=2, T=10, H=4]"),
    "ssd state head width": (lambda: _ssd(state=_t(2, 4, 2, 5)), "state must have shape [B, H, P, N]"),
    "ssd state batch": (lambda: _ssd(state=_t(1, 4, 3, 5)), "state must have shape [B, H, P, N]"),
    "ssd D": (lambda: _ssd(D=_t(3)), "D must have shape [H]"),
    "ssd C groups": (lambda: _ssd(C=_t(2, 10, 1, 5)), "C must have shape [B, T, G, N]"),
    "conv_silu kernel size": (
        lambda: _conv("conv_silu", state=_t(2, 6, 2)),
        "state must hold the last K-1 = 3 inputs",
    ),
    "conv_silu channels": (
        lambda: _conv("conv_silu", weight=_t(5, 4)),
        "weight must have shape [C, K] = [C=6, K]",
    ),
    "conv_silu bias": (lambda: _conv("conv_silu", bias=_t(5)), "bias must have shape [C]"),
    "conv_silu state batch": (
        lambda: _conv("conv_silu", state=_t(3, 6, 3)),
        "state must have shape [B, C, W]",
    ),
    "conv_silu lengths": (
        lambda: _conv("conv_silu", lengths=torch.tensor([7, 7, 7])),
        "lengths must have shape [B]",
    ),
    "conv kernel size": (lambda: _conv("conv", state=_t(2, 6, 4)), "state must hold the last K-1 = 3 inputs"),
    "conv channels": (lambda: _conv("conv", x=_t(2, 7, 5)), "weight must have shape [C, K] = [C=5, K]"),
    "gated_rmsnorm groups 0": (lambda: _gnorm(groups=0), "groups must be a positive divisor of E = 8, got 0"),
    "gated_rmsnorm groups 3": (lambda: _gnorm(groups=3), "groups must be a positive divisor of E = 8, got 3"),
    "gated_rmsnorm z": (
        lambda: _gnorm(z=_t(2, 4, 8)),
        "z must have shape [a, b, E] = [a=2, b=5, E=8], got [2, 4, 8]",
    ),
    "gated_rmsnorm weight": (lambda: _gnorm(weight=_t(6)), "weight must have shape [E] = [E=8], got [6]"),
    "wkv6 state value width": (lambda: _wkv(state=_t(1, 2, 4, 2)), "state must have shape [B, H, K, V]"),
    "wkv6 u heads": (lambda: _wkv(u=_t(3, 4)), "u must have shape [H, K] = [H=2, K=4]"),
    "wkv6 v time": (lambda: _wkv(v=_t(1, 5, 2, 3)), "v must have shape [B, T, H, V]"),
    "wkv6 w key width": (lambda: _wkv(w=_t(1, 6, 2, 5)), "w must have shape [B, T, H, K]"),
    "gru h0 batch": (lambda: _gru(h0=_t(3, 4)), "h0 must have shape [B, H] = [B=2, H]"),
    "gru w_ih input width": (
        lambda: _gru(w_ih=_t(12, 2)),
        "w_ih must have shape [G, D] = [G=12, D=3], got [12, 2]",
    ),
    "gru w_hh hidden": (lambda: _gru(w_hh=_t(12, 3)), "w_hh must have shape [G, H] = [G=12, H=4]"),
    "gru three gates": (
        lambda: _gru(w_ih=_t(9, 3), w_hh=_t(9, 4), b_ih=_t(9), b_hh=_t(9)),
        "must have 3H = 12 rows",
    ),
    "linear_rnn h0 channels": (
        lambda: _lrnn(h0=_t(2, 4)),
        "h0 must have shape [B, D] = [B=2, D=3], got [2, 4]",
    ),
    "linear_rnn a time": (lambda: _lrnn(a=_t(2, 4, 3)), "b must have shape [B, T, D] = [B=2, T=4, D=3]"),
    "delta_rule beta heads": (
        lambda: _delta(beta=_t(1, 6, 3)),
        "beta must have shape [B, T, H] = [B=1, T=6, H=2]",
    ),
    "delta_rule g time": (lambda: _delta(g=_t(1, 5, 2)), "g must have shape [B, T, H]"),
    "delta_rule state": (lambda: _delta(state=_t(1, 2, 4, 4)), "state must have shape [B, H, K, V]"),
    "gru b_hh": (lambda: _gru(b_hh=_t(11)), "b_hh must have shape [G] = [G=12], got [11]"),
}


def _kernel_cases():
    """The C++ entry points called directly with wrong sizes: TORCH_CHECK raises RuntimeError."""
    from hybridssm.ops._cpu_ext import load_extension

    scan, m2 = load_extension("selective_scan"), load_extension("mamba2_fused")
    wkv, gru = load_extension("wkv6"), load_extension("gru")
    u, At, Bm, D = _t(4, 40, 8), _t(16, 8), _t(4, 40, 16), _t(8)
    x, dt, A, Bs, H = _t(2, 10, 4, 3), _t(2, 10, 4), _t(4), _t(2, 10, 2, 5), _t(4)
    r, v = _t(1, 6, 2, 4), _t(1, 6, 2, 3)
    return {
        "scan_fwd h0 batch": (
            lambda: scan.scan_fwd(u, u, At, Bm, Bm, D, torch.zeros(1, 8, 16), False),
            "scan_fwd: h0 must have shape [4, 8, 16], got [1, 8, 16]",
        ),
        "scan_fwd B time": (
            lambda: scan.scan_fwd(u, u, At, _t(4, 39, 16), Bm, D, _t(4, 8, 16), False),
            "scan_fwd: B must have shape [4, 40, 16]",
        ),
        "scan_fwd dtype": (
            lambda: scan.scan_fwd(u, u, At.double(), Bm, Bm, D, _t(4, 8, 16), False),
            "scan_fwd: At must have dtype Float",
        ),
        "scan_bwd no checkpoints": (
            lambda: scan.scan_bwd(u, _t(4, 8, 16), u, u, At, Bm, Bm, D, torch.empty(0)),
            "scan_bwd: ckpt has 0 elements",
        ),
        "ssd_fwd groups": (
            lambda: m2.ssd_fwd(x, dt, A, _t(2, 10, 3, 5), _t(2, 10, 3, 5), H, _t(2, 4, 3, 5), False),
            "ssd_fwd: the groups of B and C (3) must divide the heads of x (4)",
        ),
        "ssd_fwd h0": (
            lambda: m2.ssd_fwd(x, dt, A, Bs, Bs, H, _t(2, 4, 3, 4), False),
            "ssd_fwd: h0 must have shape [2, 4, 3, 5]",
        ),
        "ssd_fwd strided x": (
            lambda: m2.ssd_fwd(_t(2, 10, 4, 6)[..., ::2], dt, A, Bs, Bs, H, _t(2, 4, 3, 5), False),
            "ssd_fwd: x needs a contiguous last dim",
        ),
        "conv_silu_fwd state": (
            lambda: m2.conv_silu_fwd(_t(2, 7, 6), _t(4, 6), _t(6), _t(2, 2, 6)),
            "conv_silu_fwd: st must have shape [2, 3, 6]",
        ),
        "conv_silu_fwd width 0": (
            lambda: m2.conv_silu_fwd(_t(2, 7, 6), _t(0, 6), _t(6), _t(2, 0, 6)),
            "conv width K must be in 1..64, got 0",
        ),
        "gnorm_fwd groups 0": (
            lambda: m2.gnorm_fwd(_t(2, 5, 8), _t(2, 5, 8), _t(8), 0, 1e-5),
            "gnorm_fwd: groups must be a positive divisor of E = 8, got 0",
        ),
        "gnorm_fwd weight": (
            lambda: m2.gnorm_fwd(_t(2, 5, 8), _t(2, 5, 8), _t(7), 2, 1e-5),
            "gnorm_fwd: weight must have shape [8]",
        ),
        "wkv6_fwd state": (
            lambda: wkv.wkv6_fwd(r, r, v, r, _t(2, 4), _t(1, 2, 4, 4), False),
            "wkv6_fwd: s0 must have shape [1, 2, 4, 3]",
        ),
        "wkv6_fwd u": (
            lambda: wkv.wkv6_fwd(r, r, v, r, _t(2, 3), _t(1, 2, 4, 3), False),
            "wkv6_fwd: u must have shape [2, 4]",
        ),
        "gru_fwd h0": (
            lambda: gru.gru_fwd(_t(2, 5, 12), _t(3, 4), _t(12, 4), _t(12), False),
            "gru_fwd: h0 must have shape",
        ),
        "gru_fwd w_hh": (
            lambda: gru.gru_fwd(_t(2, 5, 12), _t(2, 4), _t(12, 3), _t(12), False),
            "gru_fwd: w_hh must have shape [12, 4]",
        ),
        "gru_bwd gates": (
            lambda: gru.gru_bwd(_t(2, 5, 4), _t(2, 5, 4), _t(2, 4), _t(12, 4), torch.empty(0)),
            "gru_bwd: gates has 0 elements",
        ),
    }


def _main() -> None:
    """Run every case (in the subprocess), one JSON line each, flushed before the next case starts."""
    from hybridssm.ops import use_kernels

    def run(name, backend, fn, expected):
        try:
            with use_kernels("fused" if backend == "kernel" else backend):
                fn()
            result = ("no error", "")
        except Exception as exc:  # report every kind: the test says which was wanted
            result = (type(exc).__name__, str(exc).splitlines()[0])
        print(json.dumps([name, backend, *result, expected]), flush=True)

    for name, (fn, expected) in CASES.items():
        for backend in ("ref", "torch", "fused"):
            run(name, backend, fn, expected)
    for name, (fn, expected) in _kernel_cases().items():
        run(name, "kernel", fn, expected)


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parents[2] / "src")])}
    p = subprocess.run([sys.executable, "-c", "import test_op_checks; test_op_checks._main()"], env=env,
                       capture_output=True, text=True, timeout=900)
    out = {}
    for line in p.stdout.splitlines():
        name, backend, kind, msg, expected = json.loads(line)
        out[name, backend] = (kind, msg, expected)
    return out, p.returncode, p.stderr[-2000:]


@pytest.mark.parametrize("name", list(CASES))
def test_wrong_shape_raises_value_error_on_every_backend(results, name):
    got, rc, err = results
    for backend in ("ref", "torch", "fused"):
        assert (name, backend) in got, f"no result: the subprocess died (rc {rc}) before it; stderr: {err}"
        kind, msg, expected = got[name, backend]
        assert kind == "ValueError" and expected in msg, (backend, kind, msg)


KERNEL_CASES = [
    "scan_fwd h0 batch", "scan_fwd B time", "scan_fwd dtype", "scan_bwd no checkpoints", "ssd_fwd groups",
    "ssd_fwd h0", "ssd_fwd strided x", "conv_silu_fwd state", "conv_silu_fwd width 0", "gnorm_fwd groups 0",
    "gnorm_fwd weight", "wkv6_fwd state", "wkv6_fwd u", "gru_fwd h0", "gru_fwd w_hh", "gru_bwd gates",
]


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_kernel_entry_point_checks_its_sizes(results, name):
    got, rc, err = results
    assert (name, "kernel") in got, f"no result: the subprocess died (rc {rc}) before it; stderr: {err}"
    kind, msg, expected = got[name, "kernel"]
    assert kind == "RuntimeError" and expected in msg, (kind, msg)


def test_every_kernel_case_is_listed():
    # KERNEL_CASES names the cases of _kernel_cases() without building the kernels at collection
    source = (HERE / "test_op_checks.py").read_text()
    for name in KERNEL_CASES:
        assert f'"{name}": (' in source
