"""Mamba2Mixer and the ``mamba2`` model: streaming, chunking, padding, dtypes, options."""

from __future__ import annotations

import pytest
import torch

import hybridssm as hs
from helpers import assert_close, assert_tree_close
from hybridssm.backbones import get_backbone
from hybridssm.layers import is_fp32_no_decay
from hybridssm.mixers.mamba2 import Mamba2Mixer, Mamba2State, default_ssm_head_dim

TINY = dict(state_size=4, expand_factor=2, conv_size=3, ssm_head_dim=4, num_groups=2, scan_chunk_size=8)


def _mixer(**kw):
    torch.manual_seed(0)
    m = Mamba2Mixer(12, **{**TINY, **kw}).eval()
    # Spread the decays so that the state matters over a short sequence.
    with torch.no_grad():
        m.dt_bias.add_(1.0)
    return m


def _stream(m, x, state, inplace):
    ys = []
    for t in range(x.shape[1]):
        y, new = m(x[:, t : t + 1], state, inplace=inplace)
        if inplace:
            assert all(a is b for a, b in zip(new, state))
        state = new
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kw", [{}, dict(num_groups=1, ssm_head_dim=8, conv_size=1)])
def test_step_equals_forward(inplace, kw):
    m = _mixer(**kw)
    x = torch.randn(3, 19, 12)
    y_full, s_full = m(x, m.init_state(3))
    state = m.init_state(3)
    before = [t.clone() for t in state]
    y_step, s_step = _stream(m, x, state, inplace)
    assert_close(y_step, y_full)
    assert_tree_close(s_step, s_full)
    if not inplace:
        assert_tree_close(state, Mamba2State(*before))  # untouched


@pytest.mark.parametrize("splits", [(1, 2), (5, 17), (8, 9), (3, 20)])
def test_chunked_forward_from_state(splits):
    m = _mixer()
    x = torch.randn(2, 25, 12)
    y_full, s_full = m(x)
    a, b = splits
    y1, s = m(x[:, :a])
    y2, s = m(x[:, a:b], s)
    y3, s = m(x[:, b:], s)
    assert_close(torch.cat([y1, y2, y3], dim=1), y_full)
    assert_tree_close(s, s_full)


def test_lengths_give_each_rows_output_and_state():
    m = _mixer()
    T = 13
    lengths = torch.tensor([13, 1, 7, 2])
    x = torch.randn(4, T, 12)
    init = m.init_state(4)
    with torch.no_grad():  # start from a non-zero state: padding must not move it
        init = Mamba2State(*(torch.randn_like(t) for t in init))
    y, s = m(x, init, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        row_init = Mamba2State(*(t[b : b + 1] for t in init))
        y_b, s_b = m(x[b : b + 1, :n], row_init)
        assert_close(y[b : b + 1, :n], y_b)
        assert_tree_close(Mamba2State(*(t[b : b + 1] for t in s)), s_b)
    assert torch.isfinite(y).all()


def test_state_shapes_and_dtypes():
    m = _mixer()
    s = m.init_state(5)
    H = m.d_inner // 4
    assert s.conv.shape == (5, m.d_inner + 2 * 2 * 4, 2) and s.conv.dtype == torch.float32
    assert s.ssm.shape == (5, H, 4, 4) and s.ssm.dtype == torch.float32
    s64 = m.double().init_state(2)
    assert s64.ssm.dtype == torch.float64
    s16 = m.init_state(2, dtype=torch.bfloat16)
    assert s16.conv.dtype == torch.bfloat16 and s16.ssm.dtype == torch.float32


def test_marked_parameters():
    m = _mixer()
    marked = {n for n, p in m.named_parameters() if is_fp32_no_decay(p)}
    assert marked == {"A_log", "D", "dt_bias", "norm.weight"}


def test_initialisation_ranges():
    m = Mamba2Mixer(256)
    assert m.head_dim == 64 and m.num_heads == 8 and m.state_size == 16
    A = torch.exp(m.A_log)
    assert ((A >= 1) & (A <= 16)).all()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert ((dt >= 1e-4 - 1e-7) & (dt <= 0.1 + 1e-6)).all()
    assert torch.equal(m.D, torch.ones(8))
    assert m.in_proj.bias is None and m.out_proj.bias is None


def test_autocast_bf16_keeps_states_fp32():
    m = _mixer()
    x = torch.randn(2, 11, 12)
    y32, s32 = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = m(x)
    assert s.ssm.dtype == torch.float32
    assert_close(y.float(), y32, "bf16")
    assert_close(s.ssm, s32.ssm, "bf16")


def test_default_head_dim_rule():
    assert default_ssm_head_dim(512) == 64
    assert default_ssm_head_dim(64) == 64
    assert default_ssm_head_dim(100) == 50
    assert default_ssm_head_dim(6) == 6
    assert default_ssm_head_dim(2 * 97) == 2
    for hidden in (1, 3, 32, 50, 97):
        Mamba2Mixer(hidden)  # every width builds


@pytest.mark.parametrize(
    "kw,name",
    [
        (dict(state_size=0), "state_size"),
        (dict(expand_factor=-1), "expand_factor"),
        (dict(conv_size=0), "conv_size"),
        (dict(ssm_head_dim=5), "ssm_head_dim"),
        (dict(ssm_head_dim=0), "ssm_head_dim"),
        (dict(num_groups=3), "num_groups"),
        (dict(scan_chunk_size=0), "scan_chunk_size"),
        (dict(num_groups=1.5), "num_groups"),
    ],
)
def test_bad_options(kw, name):
    with pytest.raises(ValueError, match=name):
        Mamba2Mixer(16, **kw)
    with pytest.raises(ValueError, match=name):
        hs.Mamba2Config(embed_dim=4, hidden_size=16, **kw)


def test_model_registration_and_sizes():
    cfg = hs.Mamba2Config(embed_dim=7)
    assert (cfg.hidden_size, cfg.state_size, cfg.expand_factor, cfg.conv_size) == (256, 16, 2, 4)
    assert (cfg.num_layers, cfg.dropout, cfg.window_size, cfg.num_groups) == (2, 0.0, 60, 1)
    assert cfg.ssm_head_dim is None and cfg.scan_chunk_size == 64
    assert hs.recommended_defaults("mamba2")["dropout"] == 0.1
    model = hs.build("mamba2", embed_dim=7, hidden_size=64, num_groups=2)
    assert isinstance(model, hs.Mamba2)
    assert hs.param_count("mamba2", embed_dim=7, hidden_size=64, num_groups=2) == sum(
        p.numel() for p in model.parameters()
    )
    assert "mamba2" in hs.list_models()
    spec = get_backbone("mamba2")
    assert spec.seed_options == ("state_size", "expand_factor", "conv_size")
    assert set(spec.options) == {
        "ssm_head_dim", "num_groups", "scan_chunk_size", "A_init_range", "dt_min", "dt_max",
        "dt_init_floor", "dt_limit", "D_has_hdim", "norm_before_gate", "conv_bias", "proj_bias",
        "norm_eps",
    }


def test_model_step_equals_forward_and_padding():
    model = hs.build("mamba2", embed_dim=5, hidden_size=16, scan_chunk_size=4, num_layers=2).eval()
    x = torch.randn(3, 11, 5)
    ys = model(x, return_sequence=True)
    state = model.init_state(3)
    outs = []
    for t in range(11):
        y_t, state = model.step(x[:, t], state, inplace=True)
        outs.append(y_t)
    assert_close(torch.stack(outs, dim=1), ys)
    lengths = torch.tensor([11, 4, 9])
    y, st = model(x, lengths=lengths, return_state=True)
    for b, n in enumerate(lengths.tolist()):
        y_b, st_b = model(x[b : b + 1, :n], return_state=True)
        assert_close(y[b : b + 1], y_b)
        assert_tree_close(st.index(b), st_b)


@pytest.mark.slow  # the conformance suite compiles every model in the fast run
def test_compile_fullgraph_forward_backward_and_step():
    model = hs.build("mamba2", embed_dim=5, hidden_size=16, scan_chunk_size=4).eval()
    x = torch.randn(2, 9, 5)
    fwd = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(fwd(x, return_sequence=True), model(x, return_sequence=True))
    xg = x.clone().requires_grad_()
    (g_c,) = torch.autograd.grad(fwd(xg, return_sequence=True).square().sum(), xg)
    (g_e,) = torch.autograd.grad(model(xg, return_sequence=True).square().sum(), xg)
    assert_close(g_c, g_e)
    state = model.init_state(2)
    step = torch.compile(model.step, fullgraph=True, backend="aot_eager")
    y, s = step(x[:, 0], state)
    y_e, s_e = model.step(x[:, 0], state)
    assert_close(y, y_e)
    assert_tree_close(s, s_e)
