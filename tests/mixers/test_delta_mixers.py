"""DeltaNet and Gated DeltaNet mixers: the mixer contract (streaming, chunking, padding, compile)."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close, assert_tree_close
from hybridssm.backbones import get_backbone
from hybridssm.layers import is_fp32_no_decay
from hybridssm.mixers.delta_net import DeltaNetMixer, DeltaNetState
from hybridssm.mixers.gated_delta_net import GatedDeltaNetMixer

MIXERS = {"delta_net": DeltaNetMixer, "gated_delta_net": GatedDeltaNetMixer}
D = 16
TINY = dict(num_heads=2, head_dim=4, expand_v=2, scan_chunk_size=8, conv_size=4)
T = 2 * 8 + 3  # 2 * chunk + 3


def _mixer(name, **kw):
    opts = {**TINY, **kw}
    return MIXERS[name](D, **opts).eval()


@pytest.fixture(params=sorted(MIXERS))
def name(request):
    return request.param


def _clone(state):
    return type(state)(*(s.clone() for s in state))


def test_state_fields_and_shapes(name):
    m = _mixer(name)
    s = m.init_state(3)
    assert isinstance(s, DeltaNetState)
    assert s.conv_q.shape == (3, 8, 3) and s.conv_k.shape == (3, 8, 3) and s.conv_v.shape == (3, 16, 3)
    assert s.S.shape == (3, 2, 4, 8) and s.S.dtype == torch.float32
    s64 = m.double().init_state(2)
    assert s64.S.dtype == torch.float64 and s64.conv_q.dtype == torch.float64


@pytest.mark.parametrize("inplace", [False, True])
def test_step_equals_forward(name, inplace):
    m = _mixer(name)
    x = torch.randn(2, T, D)
    with torch.no_grad():
        y_full, s_full = m(x)
        state = m.init_state(2)
        ys = []
        for t in range(T):
            before = _clone(state)
            y_t, new = m(x[:, t : t + 1], state, inplace=inplace)
            if inplace:
                assert all(a is b for a, b in zip(new, state)), "inplace returns the given buffers"
            else:
                assert_tree_close(state, before, msg="functional step modified its input state")
            state = new
            ys.append(y_t)
    assert_close(torch.cat(ys, dim=1), y_full)
    assert_tree_close(state, s_full)


def test_chunked_forward_from_state(name):
    m = _mixer(name)
    x = torch.randn(2, T, D)
    with torch.no_grad():
        y_full, s_full = m(x)
        y1, s = m(x[:, :5])
        y2, s = m(x[:, 5:14], s)
        y3, s = m(x[:, 14:], s)
    assert_close(torch.cat([y1, y2, y3], dim=1), y_full)
    assert_tree_close(s, s_full)


def test_lengths_give_each_rows_unpadded_run(name):
    m = _mixer(name)
    x = torch.randn(3, T, D)
    lengths = torch.tensor([T, 7, 1])
    with torch.no_grad():
        s0 = m(torch.randn(3, 3, D))[1]  # combined with a starting state
        y, s = m(x, s0, lengths=lengths)
        for b, L in enumerate(lengths.tolist()):
            row_state = type(s0)(*(f[b : b + 1] for f in s0))
            y_b, s_b = m(x[b : b + 1, :L], row_state)
            assert_close(y[b : b + 1, :L], y_b, msg=f"row {b} outputs")
            assert_tree_close(type(s)(*(f[b : b + 1] for f in s)), s_b, msg=f"row {b} state")
        assert torch.isfinite(y).all()


def test_gradients_finite(name):
    m = _mixer(name).train()
    x = torch.randn(2, T, D, requires_grad=True)
    y, s = m(x, lengths=torch.tensor([T, 5]))
    (y.square().mean() + s.S.square().mean()).backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert torch.isfinite(x.grad).all()


def test_compiled_step_matches_eager(name):
    m = _mixer(name)
    x = torch.randn(2, 4, D)
    with torch.no_grad():
        _, state = m(x[:, :3])
        x_t = x[:, 3:]
        y_e, s_e = m(x_t, _clone(state))
        step = torch.compile(lambda xt, st: m(xt, st), fullgraph=True, backend="aot_eager")
        y_c, s_c = step(x_t, _clone(state))
    assert_close(y_c, y_e)
    assert_tree_close(s_c, s_e)


def test_autocast_bf16_keeps_fp32_state(name):
    m = _mixer(name)
    x = torch.randn(2, T, D)
    with torch.no_grad():
        y32, s32 = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, s = m(x)
    assert s.S.dtype == torch.float32
    assert_close(y.float(), y32, "bf16")
    assert_close(s.S, s32.S, "bf16")


def test_fp32_marks_and_gate_params():
    g = _mixer("gated_delta_net")
    assert is_fp32_no_decay(g.A_log) and is_fp32_no_decay(g.dt_bias)
    assert ((g.A_log.exp() >= 1) & (g.A_log.exp() <= 16)).all()
    dt = torch.nn.functional.softplus(g.dt_bias)
    assert ((dt > 0.9e-4) & (dt < 0.11)).all()
    assert not hasattr(_mixer("delta_net"), "A_log")


def test_default_sizes_fit_any_width(name):
    m = MIXERS[name](256)
    assert (m.num_heads, m.head_dim, m.head_v_dim) == (4, 64, 64)
    small = MIXERS[name](32)
    assert (small.num_heads, small.head_dim) == (1, 32)
    assert MIXERS[name](96, num_heads=3).head_dim == 32
    assert MIXERS[name](96, head_dim=16).num_heads == 6
    y, _ = small(torch.randn(1, 3, 32))
    assert y.shape == (1, 3, 32)


@pytest.mark.parametrize(
    "opt,value",
    [("num_heads", 0), ("head_dim", -1), ("conv_size", 0), ("scan_chunk_size", 0),
     ("expand_v", 0.3), ("expand_v", "2"), ("allow_neg_eigval", 1)],
)
def test_bad_options(name, opt, value):
    with pytest.raises(ValueError, match=opt):
        MIXERS[name](32, **{opt: value})


def test_allow_neg_eigval_streams(name):
    m = _mixer(name, allow_neg_eigval=True, conv_size=1)
    x = torch.randn(2, 11, D)
    with torch.no_grad():
        y, s = m(x)
        state, ys = m.init_state(2), []
        for t in range(11):
            y_t, state = m(x[:, t : t + 1], state)
            ys.append(y_t)
    assert_close(torch.cat(ys, 1), y)
    assert_tree_close(state, s)


def test_registered_as_backbones(name):
    spec = get_backbone(name)
    assert spec.factory is MIXERS[name]
    assert spec.seed_options == ("conv_size",)
    assert set(spec.options) == {"num_heads", "head_dim", "expand_v", "scan_chunk_size", "allow_neg_eigval"}
