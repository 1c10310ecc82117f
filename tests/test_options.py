"""The options users of `transformers` and `mamba_ssm` expect: defaults, effects and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hybridssm as hs
from helpers import assert_close
from hybridssm.layers import FFN, LayerNorm, RMSNorm
from hybridssm.mixers.attention import AttentionMixer
from hybridssm.mixers.mamba import MambaMixer
from hybridssm.mixers.mamba2 import GatedRMSNorm, Mamba2Mixer

SMALL = dict(embed_dim=4, hidden_size=16, num_layers=1, dropout=0.0)


# -- Mamba ----------------------------------------------------------------------------------------
def test_mamba_defaults_are_the_reference_libraries():
    c = hs.MambaConfig(embed_dim=4)
    assert (c.dt_rank, c.dt_min, c.dt_max, c.dt_init_floor, c.dt_init) == (None, 1e-3, 0.1, 1e-4, "random")
    assert (c.conv_bias, c.proj_bias, c.norm, c.norm_eps) == (True, False, "layernorm", None)
    mixer = hs.build("mamba", **SMALL).blocks[0].mixer
    assert mixer.ssm.dt_rank == 1 and mixer.in_proj.bias is None and mixer.conv.bias is not None


def test_mamba_options_shape_and_initialise_the_mixer():
    torch.manual_seed(0)
    opts = dict(SMALL, hidden_size=32, dt_rank=5, dt_min=0.01, dt_max=0.02, dt_init_floor=0.015,
                dt_init="constant", conv_bias=False, proj_bias=True)
    model = hs.build("mamba", **opts)
    m = model.blocks[0].mixer
    assert m.ssm.x_proj.weight.shape[0] == 5 + 2 * 16 and m.ssm.dt_proj.weight.shape == (64, 5)
    assert torch.all(m.ssm.dt_proj.weight == 5**-0.5)  # "constant"
    dt = F.softplus(m.ssm.dt_bias)
    assert dt.min() >= 0.015 - 1e-6 and dt.max() <= 0.02 + 1e-6  # the range, floored
    assert m.conv.bias is None and m.in_proj.bias is not None and m.out_proj.bias is not None
    assert hs.param_count("mamba", **opts) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("opts, match", [
    (dict(dt_rank=0), "'dt_rank' must be a positive integer.*or None, got 0"),
    (dict(dt_min=0.2), "'dt_min'=0.2 and 'dt_max'=0.1: need dt_min <= dt_max"),
    (dict(dt_init_floor=-1.0), "'dt_init_floor' must be a finite number > 0, got -1.0"),
    (dict(dt_init="normal"), "'dt_init' must be one of 'random', 'constant'; got 'normal'"),
    (dict(conv_bias=1), "'conv_bias' must be True or False, got 1"),
    (dict(norm="batchnorm"), "'norm' must be one of 'layernorm', 'rmsnorm'; got 'batchnorm'"),
    (dict(norm_eps=0.0), "'norm_eps' must be a finite number > 0, got 0.0"),
])
def test_mamba_bad_values_name_option_value_and_rule(opts, match):
    with pytest.raises(ValueError, match=match):
        hs.MambaConfig(embed_dim=4, **opts)


def test_options_a_model_does_not_have_are_refused():
    with pytest.raises(TypeError, match="unknown option 'dt_rank'"):
        hs.build("gated_ssm", embed_dim=4, dt_rank=2)
    with pytest.raises(TypeError, match="unknown option 'D_has_hdim'"):
        hs.build("mamba", embed_dim=4, D_has_hdim=True)
    with pytest.raises(TypeError, match="unknown option 'num_kv_heads'"):
        hs.build("mamba", embed_dim=4, num_kv_heads=1)
    with pytest.raises(ValueError, match="'rope_theta'=500.0 changes nothing with positional='none'"):
        hs.build("hybrid", embed_dim=4, rope_theta=500.0)


# -- Mamba-2 --------------------------------------------------------------------------------------
def test_mamba2_A_init_range_and_dt_limit(monkeypatch):
    torch.manual_seed(0)
    m = Mamba2Mixer(16, A_init_range=(2.0, 3.0), dt_limit=(0.05, 0.06))
    A = torch.exp(m.A_log)
    assert A.min() >= 2.0 - 1e-6 and A.max() <= 3.0 + 1e-6
    seen = {}
    import hybridssm.mixers.mamba2 as mod

    def spy(x, dt, *a, **kw):
        seen["dt"] = dt
        return real(x, dt, *a, **kw)

    real = mod.ssd
    monkeypatch.setattr(mod, "ssd", spy)
    m(torch.randn(2, 5, 16) * 10)
    assert seen["dt"].min() >= 0.05 and seen["dt"].max() <= 0.06
    assert (seen["dt"] == 0.05).any()  # the default init lies below: clamped


def test_mamba2_D_has_hdim_is_per_channel_skip():
    torch.manual_seed(0)
    per_head = Mamba2Mixer(16, ssm_head_dim=8)
    per_chan = Mamba2Mixer(16, ssm_head_dim=8, D_has_hdim=True)
    assert per_head.D.shape == (4,) and per_chan.D.shape == (32,)
    with torch.no_grad():
        per_head.D.copy_(torch.tensor([0.5, -1.0, 2.0, 3.0]))
        state = {k: v for k, v in per_head.state_dict().items() if k != "D"}
        per_chan.load_state_dict({**state, "D": per_head.D.repeat_interleave(8)})
    x = torch.randn(2, 6, 16)
    assert_close(per_chan(x)[0], per_head(x)[0])


def test_mamba2_norm_before_gate():
    norm = GatedRMSNorm(8, 2, 1e-5, norm_before_gate=True)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    y, z = torch.randn(3, 8), torch.randn(3, 8)
    g = y.view(3, 2, 4)
    want = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 8) * norm.weight * F.silu(z)
    assert_close(norm(y, z), want)


@pytest.mark.parametrize("opts, match", [
    (dict(A_init_range=(0.0, 16.0)), "'A_init_range' must be a pair \\(lo, hi\\) with 0 < lo <= hi"),
    (dict(dt_limit=(0.1, 0.1)), "'dt_limit' must be a pair \\(lo, hi\\) with 0 <= lo < hi"),
    (dict(D_has_hdim="yes"), "'D_has_hdim' must be True or False"),
])
def test_mamba2_bad_values(opts, match):
    with pytest.raises(ValueError, match=match):
        hs.Mamba2Config(embed_dim=4, **opts)


def test_mamba2_num_groups_is_ngroups_and_norm_eps_reaches_the_gated_norm():
    model = hs.build("mamba2", **SMALL, expand_factor=2, ssm_head_dim=8, num_groups=2, norm_eps=1e-3)
    m = model.blocks[0].mixer
    assert m.num_groups == 2 and m.norm.groups == 2 and m.norm.eps == 1e-3


# -- norms ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["mamba", "mamba2", "gated_ssm", "hybrid", "hymba", "ss_transformer", "transformer"]
)
def test_norm_option_reaches_every_block_and_the_final_norm(name):
    model = hs.build(name, **SMALL, norm="rmsnorm", norm_eps=1e-4)
    norms = [m for m in model.modules() if isinstance(m, (LayerNorm, RMSNorm))]
    block_norms = [model.final_norm] + [b.norm for b in model.blocks]
    assert all(isinstance(n, RMSNorm) and n.eps == 1e-4 for n in block_norms)
    assert any(isinstance(n, RMSNorm) for n in norms)
    default = hs.build(name, **SMALL)
    assert isinstance(default.final_norm, LayerNorm) and default.final_norm.eps == 1e-5


# -- attention: GQA, rope_theta, attention_dropout ---------------------------------------------------
def _mha_twin(gqa: AttentionMixer) -> AttentionMixer:
    """The same attention with every key/value head repeated: H key/value heads."""
    H, Hk, Dh = gqa.num_heads, gqa.num_kv_heads, gqa.head_dim
    d = gqa.o_proj.out_features
    mha = AttentionMixer(d, H, Dh, positional=gqa.positional, window_size=gqa.window_size)
    g = H // Hk
    with torch.no_grad():
        w, b = gqa.qkv_proj.weight.view(H + 2 * Hk, Dh, d), gqa.qkv_proj.bias.view(H + 2 * Hk, Dh)
        wq, wk, wv = w.split([H, Hk, Hk])
        bq, bk, bv = b.split([H, Hk, Hk])
        rep = lambda t: t.repeat_interleave(g, dim=0)  # noqa: E731
        mha.qkv_proj.weight.copy_(torch.cat([wq, rep(wk), rep(wv)]).reshape(-1, d))
        mha.qkv_proj.bias.copy_(torch.cat([bq, rep(bk), rep(bv)]).reshape(-1))
        mha.o_proj.load_state_dict(gqa.o_proj.state_dict())
    return mha


@pytest.mark.parametrize("window", [None, 3])
def test_grouped_query_attention_equals_repeated_heads_and_caches_fewer(window):
    torch.manual_seed(0)
    gqa = AttentionMixer(16, 4, 8, num_kv_heads=2, positional="rope", window_size=window)
    mha = _mha_twin(gqa)
    x = torch.randn(2, 7, 16)
    assert_close(gqa(x)[0], mha(x)[0])
    state = gqa.init_state(2, max_len=16)
    assert state.k.shape[1] == 2 and state.v.shape[1] == 2  # the cache holds num_kv_heads heads
    y, state = gqa(x[:, :4], state)
    steps = [gqa(x[:, t : t + 1], state)[0] for t in (4,)]
    assert_close(torch.cat([y, steps[0]], 1), mha(x[:, :5])[0])


def test_num_kv_heads_must_divide_num_heads():
    with pytest.raises(ValueError, match="'num_kv_heads' must divide num_heads=4, got 3"):
        hs.build("transformer", embed_dim=4, num_heads=4, num_kv_heads=3)
    model = hs.build("hybrid", **SMALL, num_heads=4, head_dim=4, num_kv_heads=2, attention_every=1)
    assert model.blocks[0].mixer.num_kv_heads == 2 and model.init_state(1).layers[0].k.shape[1] == 2


def test_rope_theta_reaches_the_rotation():
    torch.manual_seed(0)
    a = hs.build("transformer", **SMALL, rope_theta=100.0).eval()
    b = hs.build("transformer", **SMALL).eval()
    b.load_state_dict(a.state_dict())
    assert a.blocks[0].mixer.rope_theta == 100.0 and b.blocks[0].mixer.rope_theta == 10000.0
    x = torch.randn(1, 6, 4)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_attention_dropout_drops_in_training_only():
    torch.manual_seed(0)
    model = hs.build("transformer", **SMALL, attention_dropout=0.5)
    x = torch.randn(2, 5, 4)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="'attention_dropout'=0.5 needs full attention"):
        hs.build("hybrid", embed_dim=4, attention_dropout=0.5)  # sliding window by default


# -- FFN ------------------------------------------------------------------------------------------
def test_ffn_multiplier_and_swiglu():
    model = hs.build("transformer", **SMALL, ffn_multiplier=2, ffn_activation="swiglu")
    ffn = model.blocks[0].ffn.ffn
    assert isinstance(ffn, FFN) and ffn.up.out_features == 32 and ffn.gate is not None
    x = torch.randn(3, 16)
    assert_close(ffn(x), ffn.down(F.silu(ffn.gate(x)) * ffn.up(x)))
    with pytest.raises(ValueError, match="'ffn_activation' must be one of 'gelu', 'swiglu'; got 'relu'"):
        hs.build("hybrid", embed_dim=4, ffn_activation="relu")
    assert math.isclose(hs.HybridConfig(embed_dim=4).ffn_multiplier, 4)


def test_hybrid_mamba_backbones_take_the_mamba_options_through_backbone_options():
    model = hs.build("hybrid", **SMALL, num_heads=2, head_dim=8, attention_every=2,
                     backbone_options={"dt_rank": 3, "proj_bias": True, "dt_init": "constant"})
    m = model.blocks[0].mixer
    assert isinstance(m, MambaMixer) and m.ssm.dt_rank == 3 and m.in_proj.bias is not None
    with pytest.raises(ValueError, match="'dt_init' must be one of 'random', 'constant'"):
        hs.build("hybrid", **SMALL, backbone_options={"dt_init": "zeros"})
