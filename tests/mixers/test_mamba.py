"""MambaMixer / SelectiveSSM / CausalConv1d and the ``mamba`` model: the mixer contract (streaming,
chunking, padding, inplace), the reference initialisation, and the fused step path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hybridssm as hs
from helpers import assert_close, assert_tree_close
from hybridssm.layers import is_fp32_no_decay
from hybridssm.mixers import mamba as mamba_mod
from hybridssm.mixers.mamba import MambaMixer, MambaState
from hybridssm.ops import use_kernels
from hybridssm.ops.step import fused_step_available

BACKENDS = ["ref", "torch", "auto"]  # auto: the fused scan and step (the conv has no fused form)


def _mixer(d=16, N=4, K=4, seed=0):
    torch.manual_seed(seed)
    m = MambaMixer(d, state_size=N, expand_factor=2, conv_size=K)
    with torch.no_grad():  # move the state away from zero so the tests see it
        m.conv.bias.normal_()
        m.ssm.D.normal_()
    return m


def _stream(m, x, state, inplace):
    ys = []
    for t in range(x.shape[1]):
        y, state = m(x[:, t : t + 1], state, inplace=inplace)
        ys.append(y)
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("inplace", [False, True])
def test_streaming_equals_forward(backend, grad, inplace):
    # no_grad + auto takes the fused step kernel; with grad the step runs the scan at T = 1
    m = _mixer()
    x = torch.randn(2, 9, 16)
    with use_kernels(backend), torch.set_grad_enabled(grad):
        y_full, s_full = m(x, m.init_state(2))
        s0 = m.init_state(2)
        y_step, s_step = _stream(m, x, s0, inplace)
    assert_close(y_step, y_full)
    assert_tree_close(s_step, s_full)
    if inplace:
        assert s_step.conv is s0.conv and s_step.ssm is s0.ssm
    else:
        assert torch.equal(s0.ssm, torch.zeros_like(s0.ssm))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_forward_from_state(backend):
    m = _mixer()
    x = torch.randn(2, 23, 16)
    with use_kernels(backend):
        y_full, s_full = m(x)
        y1, s = m(x[:, :2])
        y2, s = m(x[:, 2:11], s)
        y3, s = m(x[:, 11:], s)
    assert_close(torch.cat([y1, y2, y3], dim=1), y_full)
    assert_tree_close(s, s_full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_give_each_rows_unpadded_run(backend):
    m = _mixer()
    lengths = torch.tensor([7, 2, 5])
    x = torch.randn(3, 7, 16)
    with use_kernels(backend):
        y, s = m(x, lengths=lengths)
        for b, L in enumerate(lengths.tolist()):
            yb, sb = m(x[b : b + 1, :L])
            assert_close(y[b : b + 1, :L], yb)
            assert_tree_close(MambaState(s.conv[b : b + 1], s.ssm[b : b + 1]), sb)


def test_state_passed_in_is_not_modified():
    m = _mixer()
    s = MambaState(torch.randn(2, 32, 3), torch.randn(2, 32, 4))
    before = MambaState(s.conv.clone(), s.ssm.clone())
    with torch.no_grad():
        m(torch.randn(2, 1, 16), s)
        m(torch.randn(2, 5, 16), s)
    assert_tree_close(s, before)


def test_fused_step_writes_back_into_non_contiguous_state():
    """A state from forward() holds a sliced conv buffer; an inplace step must still update it."""
    m = _mixer()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        _, s = m(x[:, :5])
        ref_y, ref_s = m(x[:, 5:], s)
        y, s2 = m(x[:, 5:], s, inplace=True)
    assert s2.conv is s.conv
    assert_close(y, ref_y)
    assert_tree_close(s2, ref_s)


def test_reference_parameterisation_and_init():
    d, N = 40, 16
    m = MambaMixer(d, state_size=N, expand_factor=2, conv_size=4)
    E, R = 2 * d, math.ceil(d / 16)
    assert m.ssm.dt_rank == R
    assert m.in_proj.bias is None and m.out_proj.bias is None and m.ssm.x_proj.bias is None
    assert m.in_proj.weight.shape == (2 * E, d)
    assert m.ssm.x_proj.weight.shape == (R + 2 * N, E)
    assert m.conv.weight.shape == (E, 4) and m.conv.bias.shape == (E,)
    assert torch.allclose(m.ssm.A_log, torch.log(torch.arange(1, N + 1.0)).expand(E, N))
    assert torch.equal(m.ssm.D, torch.ones(E))
    dt = F.softplus(m.ssm.dt_bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
    assert m.ssm.dt_proj.weight.abs().max() <= R**-0.5
    for p in (m.ssm.A_log, m.ssm.D, m.ssm.dt_bias):
        assert is_fp32_no_decay(p)


def test_init_state_fields_and_dtypes():
    m = _mixer().to(torch.float64)
    s = m.init_state(3)
    assert isinstance(s, MambaState)
    assert s.conv.shape == (3, 32, 3) and s.ssm.shape == (3, 32, 4)
    assert s.ssm.dtype == torch.float64
    s = _mixer().init_state(2, dtype=torch.bfloat16)
    assert s.conv.dtype == torch.bfloat16 and s.ssm.dtype == torch.float32


def test_bf16_autocast_keeps_fp32_state():
    m = _mixer()
    x = torch.randn(2, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = m(x)
        y1, s1 = m(x[:, :1], s)
    assert s.ssm.dtype == torch.float32 and s1.ssm.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(y1).all()
    assert_close(y.float(), m(x)[0], cls="bf16")


def test_invalid_options():
    with pytest.raises(ValueError, match="state_size"):
        MambaMixer(16, state_size=0)
    with pytest.raises(ValueError, match="conv_size"):
        hs.build("mamba", embed_dim=4, conv_size=0)


def test_model_registered_and_exported():
    assert "mamba" in hs.list_models()
    assert hs.recommended_defaults("mamba") == dict(
        hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2, window_size=60,
        dropout=0.1,
    )
    m = hs.build("mamba", embed_dim=5, hidden_size=32)
    assert isinstance(m, hs.Mamba) and isinstance(m.config, hs.MambaConfig)
    assert len(m.blocks) == 2 and m.blocks[0].ffn is None
    assert isinstance(m.blocks[0].mixer, hs.MambaMixer)
    assert isinstance(m.blocks[0].mixer.ssm, hs.SelectiveSSM)
    assert isinstance(m.blocks[0].mixer.conv, hs.CausalConv1d)
    assert hs.param_count("mamba", embed_dim=5, hidden_size=32) == sum(p.numel() for p in m.parameters())
    assert isinstance(hs.MambaBlock(32), hs.ResidualBlock)
    from hybridssm.backbones import get_backbone

    assert get_backbone("mamba").seed_options == ("state_size", "expand_factor", "conv_size")


def test_model_stream_and_compile():
    torch.manual_seed(0)
    m = hs.build("mamba", embed_dim=5, hidden_size=16, state_size=4).eval()
    x = torch.randn(2, 7, 5)
    with torch.no_grad():
        y = m(x, return_sequence=True)
        s = m.init_state(2)
        step = torch.compile(m.step, fullgraph=True, backend="aot_eager")
        outs = []
        for t in range(7):
            o, s = step(x[:, t], s)
            outs.append(o)
        assert_close(torch.stack(outs, 1), y)
        fwd = torch.compile(m, fullgraph=True, backend="aot_eager")
        assert_close(fwd(x, return_sequence=True), y)


def _rms(v, w, eps):
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * w


def test_inner_norms_normalise_dt_B_and_C_as_jamba():
    torch.manual_seed(0)
    m = MambaMixer(16, state_size=4, conv_size=3, dt_rank=3, inner_norms=True, inner_norm_eps=1e-5)
    ssm = m.ssm
    with torch.no_grad():
        for norm in (ssm.dt_norm, ssm.b_norm, ssm.c_norm):
            norm.weight.add_(0.3 * torch.randn_like(norm.weight))
    assert all(is_fp32_no_decay(n.weight) for n in (ssm.dt_norm, ssm.b_norm, ssm.c_norm))
    u = torch.randn(2, 5, 32)
    dt, Bm, Cm = ssm.x_proj(u).split([3, 4, 4], dim=-1)
    delta, B_got, C_got = ssm.project(u)
    assert_close(B_got, _rms(Bm, ssm.b_norm.weight, 1e-5))
    assert_close(C_got, _rms(Cm, ssm.c_norm.weight, 1e-5))
    assert_close(delta, F.softplus(ssm.dt_proj(_rms(dt, ssm.dt_norm.weight, 1e-5)) + ssm.dt_bias))
    # off (the default): no norm parameters at all, and the same state_dict keys as before
    assert not [k for k in MambaMixer(16).state_dict() if "norm" in k]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inplace", [False, True])
def test_inner_norms_step_equals_the_forward_fused_or_not(backend, inplace, monkeypatch):
    torch.manual_seed(0)
    m = MambaMixer(16, state_size=4, conv_size=4, inner_norms=True)
    with torch.no_grad():
        m.conv.bias.normal_()
        for norm in (m.ssm.dt_norm, m.ssm.b_norm, m.ssm.c_norm):
            norm.weight.add_(0.3 * torch.randn_like(norm.weight))
    fused = []  # the kernel's calls: the fused step applies the inner norms too (auto, no grad)
    original = mamba_mod.mixer_step
    monkeypatch.setattr(mamba_mod, "mixer_step", lambda *a: fused.append(1) or original(*a))
    x = torch.randn(2, 9, 16)
    with use_kernels(backend), torch.no_grad():
        y_full, s_full = m(x, m.init_state(2))
        y_step, s_step = _stream(m, x, m.init_state(2), inplace)
        available = fused_step_available()
    assert_close(y_step, y_full)
    assert_tree_close(s_step, s_full)
    assert len(fused) == (9 if backend == "auto" and available else 0)


def test_inner_norm_options_are_validated():
    with pytest.raises(ValueError, match="'inner_norms' must be True or False, got 1"):
        MambaMixer(16, inner_norms=1)
    with pytest.raises(ValueError, match="'inner_norm_eps'=1e-05 changes nothing with inner_norms=False"):
        MambaMixer(16, inner_norm_eps=1e-5)
    with pytest.raises(ValueError, match="inner_norm_eps"):
        MambaMixer(16, inner_norms=True, inner_norm_eps=0.0)
