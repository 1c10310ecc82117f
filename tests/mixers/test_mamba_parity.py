"""Parity: our MambaMixer against ``transformers``' MambaMixer torch path (weights copied across), and
our ops against a textbook recurrence written here.

``transformers``' torch path drops the carried state on multi-token cached calls (REFERENCES), so only
the full forward and the single-token cached step are compared with it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from hybridssm.mixers.mamba import MambaMixer
from hybridssm.ops import use_kernels
from hybridssm.ops.conv import causal_conv1d
from hybridssm.ops.scan import selective_scan

BACKENDS = ["ref", "torch", "auto"]


def _pair(d=32, N=8, K=4, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

    cfg = transformers.MambaConfig(
        hidden_size=d, state_size=N, expand=2, conv_kernel=K, num_hidden_layers=1, vocab_size=16,
        use_bias=False, use_conv_bias=True, use_mambapy=False, use_associative_scan=False,
    )
    torch.manual_seed(seed)
    hf = HFMambaMixer(cfg, layer_idx=0).eval()
    ours = MambaMixer(d, state_size=N, expand_factor=2, conv_size=K).eval()
    with torch.no_grad():
        for p in hf.parameters():  # random values everywhere, so every weight matters
            p.normal_(0.0, 0.3)
        hf.A_log.copy_(torch.log(torch.rand_like(hf.A_log) * 4 + 0.5))
        ours.in_proj.weight.copy_(hf.in_proj.weight)
        ours.conv.weight.copy_(hf.conv1d.weight[:, 0])
        ours.conv.bias.copy_(hf.conv1d.bias)
        ours.ssm.x_proj.weight.copy_(hf.x_proj.weight)
        ours.ssm.dt_proj.weight.copy_(hf.dt_proj.weight)
        ours.ssm.dt_bias.copy_(hf.dt_proj.bias)
        ours.ssm.A_log.copy_(hf.A_log)
        ours.ssm.D.copy_(hf.D)
        ours.out_proj.weight.copy_(hf.out_proj.weight)
    return cfg, hf, ours


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 5, 37])
def test_forward_matches_transformers(backend, T):
    _, hf, ours = _pair()
    x = torch.randn(3, T, 32)
    with torch.no_grad():
        expected = hf(x)
        with use_kernels(backend):
            actual, _ = ours(x)
    assert_close(actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_step_matches_transformers(backend):
    from transformers import DynamicCache

    cfg, hf, ours = _pair()
    x = torch.randn(2, 12, 32)
    P = 9  # prefill length, then single-token cached steps
    with torch.no_grad():
        cache = DynamicCache(config=cfg)
        hf(x[:, :P], cache=cache)
        with use_kernels(backend):
            _, state = ours(x[:, :P])
        # their conv cache keeps the last K inputs, ours the last K-1
        assert_close(state.conv, cache.layers[0].conv_states[0][..., 1:])
        assert_close(state.ssm, cache.layers[0].recurrent_states[0])
        for t in range(P, x.shape[1]):
            expected = hf(x[:, t : t + 1], cache=cache)
            with use_kernels(backend):
                actual, state = ours(x[:, t : t + 1], state, inplace=True)
            assert_close(actual, expected, msg=f"step {t}")
        assert_close(state.ssm, cache.layers[0].recurrent_states[0])


# -- our ops against the textbook recurrence ---------------------------------------------------------


def _textbook_scan(u, delta, A, B, C, D, z, h0):
    """Per batch row, channel and state index, in fp64 scalars-by-vectors: the paper's equations."""
    Bsz, T, Dn = u.shape
    y = torch.zeros(Bsz, T, Dn, dtype=torch.float64)
    h = h0.double().clone()
    for b in range(Bsz):
        for t in range(T):
            for d in range(Dn):
                a_bar = torch.exp(delta[b, t, d].double() * A[d].double())  # [N] zero-order hold of A
                b_bar = delta[b, t, d].double() * B[b, t].double()  # [N] Euler step of B
                h[b, d] = a_bar * h[b, d] + b_bar * u[b, t, d].double()
                y[b, t, d] = (C[b, t].double() * h[b, d]).sum() + D[d].double() * u[b, t, d].double()
    return y * F.silu(z.double()), h


@pytest.mark.parametrize("backend", ["ref", "torch", "fused"])
def test_scan_matches_textbook(backend):
    g = torch.Generator().manual_seed(0)
    Bsz, T, Dn, N = 2, 11, 5, 3
    u, z = torch.randn(Bsz, T, Dn, generator=g), torch.randn(Bsz, T, Dn, generator=g)
    delta = F.softplus(torch.randn(Bsz, T, Dn, generator=g))
    A = -torch.rand(Dn, N, generator=g) * 3
    B, C = torch.randn(Bsz, T, N, generator=g), torch.randn(Bsz, T, N, generator=g)
    D, h0 = torch.randn(Dn, generator=g), torch.randn(Bsz, Dn, N, generator=g)
    y_tb, h_tb = _textbook_scan(u, delta, A, B, C, D, z, h0)
    with use_kernels(backend), torch.no_grad():
        y, h = selective_scan(u, delta, A, B, C, D, z, state=h0)
    assert_close(y, y_tb.float())
    assert_close(h, h_tb.float())


def test_conv_matches_textbook():
    g = torch.Generator().manual_seed(0)
    Bsz, T, Cn, K = 2, 7, 3, 4
    x, w = torch.randn(Bsz, T, Cn, generator=g), torch.randn(Cn, K, generator=g)
    bias = torch.randn(Cn, generator=g)
    state = torch.randn(Bsz, Cn, K - 1, generator=g)
    padded = torch.cat([state.transpose(1, 2), x], dim=1)  # [B, K-1+T, C]: the past, then x
    expected = torch.stack(
        [sum(w[:, k] * padded[:, t + k] for k in range(K)) + bias for t in range(T)], dim=1
    )
    y, new_state = causal_conv1d(x, w, bias, state)
    assert_close(y, expected)
    assert_close(new_state, padded[:, -(K - 1) :].transpose(1, 2))
