"""The delta-rule op: chunked form == reference loop (values, state, every gradient), gradcheck,
strong decays, and parity with ``transformers``' torch gated delta rule (Qwen3-Next)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from hybridssm.ops._kernels import use_kernels
from hybridssm.ops.delta_rule import delta_rule, delta_rule_chunked, delta_rule_ref

B, H, K, V = 2, 3, 8, 5


def _inputs(T, *, gated=True, decay_scale=1.0, beta_max=1.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    beta = beta_max * torch.rand(B, T, H, generator=gen, dtype=dtype)
    g = -decay_scale * torch.rand(B, T, H, generator=gen, dtype=dtype) if gated else None
    S0 = torch.randn(B, H, K, V, generator=gen, dtype=dtype)
    return q, k, v, beta, g, S0


def _run(backend, inputs, chunk_size):
    """Outputs, final state and the gradients of a random projection of both, on ``backend``."""
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in inputs]
    q, k, v, beta, g, S0 = leaves
    with use_kernels(backend):
        o, S = delta_rule(q, k, v, beta, g, state=S0, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(1)
    wo, ws = torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)
    ((o * wo.to(o.dtype)).sum() + (S * ws.to(S.dtype)).sum()).backward()
    return o, S, [x.grad for x in leaves if x is not None]


def _compare(inputs, chunk_size):
    o_r, S_r, g_r = _run("ref", inputs, chunk_size)
    o_c, S_c, g_c = _run("torch", inputs, chunk_size)
    assert_close(o_c, o_r, msg="outputs")
    assert_close(S_c, S_r, msg="final state")
    for name, a, e in zip(("q", "k", "v", "beta", "g", "state"), g_c, g_r):
        assert_close(a, e, msg=f"grad {name}")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T,chunk_size", [(1, 64), (7, 4), (63, 16), (200, 64), (200, 48)])
def test_chunked_matches_ref(T, chunk_size, gated):
    _compare(_inputs(T, gated=gated), chunk_size)


@pytest.mark.parametrize("decay_scale", [20.0, 200.0])
def test_strong_decay(decay_scale):
    # per-step decays down to e^-200: cumulative products underflow; the masked form must stay finite
    _compare(_inputs(70, decay_scale=decay_scale), 32)


def test_negative_eigenvalues():
    # beta in (0, 2): the "allow_neg_eigval" range
    _compare(_inputs(45, beta_max=2.0), 16)


def test_no_initial_state_and_default_chunk():
    q, k, v, beta, g, _ = _inputs(100)
    o_r, S_r = delta_rule_ref(q, k, v, beta, g)
    o_c, S_c = delta_rule_chunked(q, k, v, beta, g)
    assert_close(o_c, o_r)
    assert_close(S_c, S_r)
    assert S_c.dtype == torch.float32 and S_c.shape == (B, H, K, V)


def test_identity_steps_keep_state():
    q, k, v, beta, g, S0 = _inputs(9)
    beta[:, 4:] = 0.0
    g[:, 4:] = 0.0
    _, S_full = delta_rule_chunked(q, k, v, beta, g, state=S0, chunk_size=4)
    _, S_head = delta_rule_ref(q[:, :4], k[:, :4], v[:, :4], beta[:, :4], g[:, :4], state=S0)
    assert_close(S_full, S_head)


@pytest.mark.parametrize("gated", [False, True])
def test_gradcheck_chunked(gated):
    q, k, v, beta, g, S0 = _inputs(7, gated=gated, dtype=torch.float64)
    Kt, Vt = 3, 2  # tiny heads keep gradcheck fast
    args = [q[:1, :, :2, :Kt], k[:1, :, :2, :Kt], v[:1, :, :2, :Vt], beta[:1, :, :2]]
    args += [g[:1, :, :2]] if gated else []
    args += [S0[:1, :2, :Kt, :Vt]]
    args = [a.detach().clone().requires_grad_(True) for a in args]

    def fn(*a):
        gg = a[4] if gated else None
        return delta_rule_chunked(a[0], a[1], a[2], a[3], gg, state=a[-1], chunk_size=3)

    assert torch.autograd.gradcheck(fn, args)


def test_bad_chunk_size():
    q, k, v, beta, g, _ = _inputs(5)
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule_chunked(q, k, v, beta, g, chunk_size=0)


def test_autocast_accumulates_in_fp32():
    q, k, v, beta, g, S0 = _inputs(40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, S = delta_rule_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), beta, g, state=S0)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    o_r, S_r = delta_rule_ref(q.bfloat16(), k.bfloat16(), v.bfloat16(), beta, g, state=S0)
    assert_close(o, o_r)
    assert_close(S, S_r)


@pytest.mark.parametrize("gated", [False, True])
def test_parity_transformers_qwen3_next(gated):
    """Our op equals transformers' torch gated delta rule (Qwen3-Next) in fp32.

    Their convention: the same layouts ([B, T, H, K] streams, [B, H, K, V] state), ``g`` the log
    decay, the query always scaled by K^-1/2 (our default scale); q, k are normalised here, so
    their ``use_qk_l2norm_in_kernel`` stays off. DeltaNet is their rule with g = 0.
    """
    pytest.importorskip("transformers")
    try:
        from transformers.models.qwen3_next.modeling_qwen3_next import (
            torch_chunk_gated_delta_rule,
            torch_recurrent_gated_delta_rule,
        )
    except ImportError as exc:  # pragma: no cover - depends on the installed version
        pytest.skip(f"transformers has no Qwen3-Next torch delta rule: {exc}")
    q, k, v, beta, g, S0 = _inputs(75, gated=gated)
    g_hf = g if gated else torch.zeros_like(beta)
    o, S = delta_rule_chunked(q, k, v, beta, g, state=S0, chunk_size=32)
    o_c, S_c = torch_chunk_gated_delta_rule(
        q, k, v, g_hf, beta, chunk_size=32, initial_state=S0, output_final_state=True
    )
    o_r, S_r = torch_recurrent_gated_delta_rule(
        q, k, v, g_hf, beta, initial_state=S0, output_final_state=True
    )
    assert_close(o, o_r, msg="vs recurrent")
    assert_close(S, S_r, msg="vs recurrent (state)")
    assert_close(o, o_c, msg="vs chunked")
    assert_close(S, S_c, msg="vs chunked (state)")
