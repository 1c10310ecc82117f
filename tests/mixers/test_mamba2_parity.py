"""Parity: our Mamba-2 against ``transformers``' Mamba2Mixer (torch path) and a textbook recurrence."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from hybridssm.mixers.mamba2 import Mamba2Mixer
from hybridssm.ops.ssd import ssd

HIDDEN, N, EXPAND, K, P, G, Q = 24, 8, 2, 4, 6, 2, 8  # d_inner 48 -> 8 heads in 2 groups


def _pair():
    transformers = pytest.importorskip("transformers", minversion="5")
    from transformers.cache_utils import DynamicCache
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    E = EXPAND * HIDDEN
    cfg = transformers.Mamba2Config(
        vocab_size=16, hidden_size=HIDDEN, state_size=N, expand=EXPAND, conv_kernel=K, head_dim=P,
        num_heads=E // P, n_groups=G, chunk_size=Q, use_bias=False, use_conv_bias=True,
        layer_norm_epsilon=1e-5, num_hidden_layers=1, time_step_limit=(0.0, float("inf")),
    )
    torch.manual_seed(0)
    ours = Mamba2Mixer(
        HIDDEN, state_size=N, expand_factor=EXPAND, conv_size=K, ssm_head_dim=P, num_groups=G,
        scan_chunk_size=Q,
    ).eval()
    with torch.no_grad():  # non-trivial values everywhere
        ours.D.normal_()
        ours.norm.weight.normal_()
        ours.dt_bias.add_(1.0)
    theirs = HFMamba2Mixer(cfg, layer_idx=0).eval()
    # The layouts agree: in_proj -> [z | x, B, C | dt], conv1d [C, 1, K], per-head A_log, D, dt_bias.
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs, lambda: DynamicCache(config=cfg)


def test_full_forward_and_cached_step_match_transformers():
    ours, theirs, new_cache = _pair()
    x = torch.randn(3, 21, HIDDEN)
    with torch.no_grad():
        cache = new_cache()
        y_ref = theirs(x[:, :20], cache=cache)
        y, state = ours(x[:, :20])
        assert_close(y, y_ref, msg="full forward")
        assert_close(state.ssm, cache.get_recurrent_state(0), msg="ssm state after prefill")
        # transformers keeps the last K raw inputs, we keep K-1.
        assert_close(state.conv, cache.get_conv_state(0)[..., 1:], msg="conv state after prefill")

        y1_ref = theirs(x[:, 20:], cache=cache)  # the single-token cached path
        y1, state = ours(x[:, 20:], state)
        assert_close(y1, y1_ref, msg="cached step")
        assert_close(state.ssm, cache.get_recurrent_state(0), msg="ssm state after step")
        assert_close(state.conv, cache.get_conv_state(0)[..., 1:], msg="conv state after step")


def test_uncached_forward_matches_transformers_at_odd_lengths():
    ours, theirs, _ = _pair()
    for T in (1, 7, 33):
        x = torch.randn(2, T, HIDDEN)
        with torch.no_grad():
            assert_close(ours(x)[0], theirs(x), msg=f"T={T}")


def _textbook(x, dt, A, B, C, D, h):
    """Per batch row and head: h <- exp(dt a) h + dt x B^T; y = h C + D x (head h uses group
    h // (H / G))."""
    Bsz, T, H, _ = x.shape
    R = H // B.shape[2]
    h = h.clone()
    y = torch.zeros_like(x)
    for b in range(Bsz):
        for hd in range(H):
            g = hd // R
            for t in range(T):
                d = dt[b, t, hd]
                h[b, hd] = torch.exp(d * A[hd]) * h[b, hd] + d * torch.outer(x[b, t, hd], B[b, t, g])
                y[b, t, hd] = h[b, hd] @ C[b, t, g] + D[hd] * x[b, t, hd]
    return y, h


@pytest.mark.parametrize("T,G_", [(1, 1), (11, 2), (30, 4)])
def test_op_matches_textbook_recurrence(T, G_):
    Bsz, H, Pd, Nd = 2, 4, 3, 5
    x = torch.randn(Bsz, T, H, Pd)
    dt = torch.rand(Bsz, T, H)
    A = -torch.rand(H) * 3
    B, C = torch.randn(Bsz, T, G_, Nd), torch.randn(Bsz, T, G_, Nd)
    D, h0 = torch.randn(H), torch.randn(Bsz, H, Pd, Nd)
    y_ref, h_ref = _textbook(x, dt, A, B, C, D, h0)
    y, h = ssd(x, dt, A, B, C, D=D, state=h0, chunk_size=8)
    assert_close(y, y_ref)
    assert_close(h, h_ref)
