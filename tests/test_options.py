"""The options users of `transformers` and `mamba_ssm` expect: defaults, effects and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import hybridssm as hs
from conformance_cases import fit_options
from helpers import assert_close
from hybridssm.backbones import get_backbone
from hybridssm.config import Mamba2Options, own_options
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


# -- residual_in_fp32 -----------------------------------------------------------------------------
MODELS = ["mamba", "mamba2", "gated_ssm", "hybrid", "hymba", "ss_transformer", "transformer"]
# tiny options, those a model has: W = 3 and two layers, so that sliding windows, the hybrid's
# attention layer and Hymba's meta tokens are all in play
TINY_RES = dict(embed_dim=5, hidden_size=16, num_layers=2, state_size=4, conv_size=3, num_heads=2,
                head_dim=8, ssm_head_dim=8, window_size=3, attention_every=2, num_meta_tokens=2,
                dropout=0.0)


def _tiny(name: str, dtype: torch.dtype = torch.float32, **opts):
    torch.manual_seed(0)
    model = hs.build(name, **fit_options(name, {**TINY_RES, **opts}))
    return model.eval().to(dtype)


def _twin(model, **changes):
    """The same weights under changed options."""
    other = type(model)(model.config.replace(**changes)).eval().to(model._compute_dtype())
    other.load_state_dict(model.state_dict())
    return other


def test_residual_in_fp32_defaults_follow_the_libraries():
    for name in MODELS:
        want = name in ("mamba", "mamba2")  # transformers' / mamba_ssm's Mamba default
        assert hs.get_config_class(name)(embed_dim=4).residual_in_fp32 is want, name
    with pytest.raises(ValueError, match="'residual_in_fp32' must be True or False, got 'yes'"):
        hs.build("hymba", embed_dim=4, residual_in_fp32="yes")


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_residual_in_fp32_keeps_the_stream_fp32_in_bf16(name):
    on = _tiny(name, torch.bfloat16, residual_in_fp32=True)
    off = _twin(on, residual_in_fp32=False)
    seen: dict[str, list] = {"on": [], "off": []}
    for key, model in (("on", on), ("off", off)):
        for block in model.blocks:
            block.register_forward_hook(lambda m, a, out, key=key: seen[key].append(out[0].dtype))
    x = torch.randn(2, 6, 5).to(torch.bfloat16)
    y_on, s_on = on(x, return_sequence=True, return_state=True)
    y_off, s_off = off(x, return_sequence=True, return_state=True)
    assert seen["on"] and set(seen["on"]) == {torch.float32}  # the stream between blocks
    assert set(seen["off"]) == {torch.bfloat16}
    assert y_on.dtype == y_off.dtype == torch.bfloat16  # the output stays in the model's dtype
    assert not torch.equal(y_on, y_off)  # the fp32 stream rounds differently
    assert_close(y_on.float(), y_off.float(), "bf16")  # ... and stays the same function
    # the states hold mixer inputs, in the model's dtype either way
    assert [t.dtype for t in torch.utils._pytree.tree_leaves(s_on)] == [
        t.dtype for t in torch.utils._pytree.tree_leaves(s_off)
    ]


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_residual_in_fp32_changes_nothing_in_fp32(name):
    on = _tiny(name, residual_in_fp32=True)
    off = _twin(on, residual_in_fp32=False)
    x = torch.randn(2, 6, 5)
    assert torch.equal(on(x, return_sequence=True), off(x, return_sequence=True))


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_residual_in_fp32_step_equals_forward_in_bf16(name):
    """Streaming equals the forward (DESIGN §4 rule 1) in bf16 with the option on: functional and
    in place, and chained after a prefill, at the bf16 class."""
    model = _tiny(name, torch.bfloat16, residual_in_fp32=True)
    x = torch.randn(2, 9, 5).to(torch.bfloat16)
    full, full_state = model(x, return_sequence=True, return_state=True)
    for inplace in (False, True):
        state, ys = model.init_state(2), []
        for t in range(x.shape[1]):
            y, state = model.step(x[:, t], state, inplace=inplace)
            ys.append(y)
        assert ys[0].dtype == torch.bfloat16
        assert_close(torch.stack(ys, 1).float(), full.float(), "bf16", msg=f"{name} inplace={inplace}")
        for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(full_state)):
            assert a.dtype == b.dtype
            assert_close(a.float(), b.float(), "bf16", msg=f"{name} inplace={inplace} state")
    head, state = model(x[:, :4], return_sequence=True, return_state=True)
    tail = [model.step(x[:, t], state, inplace=True)[0] for t in range(4, 9)]
    assert_close(torch.cat([head, torch.stack(tail, 1)], 1).float(), full.float(), "bf16",
                 msg=f"{name}: prefill then steps")


def test_residual_in_fp32_with_gradient_checkpointing_in_bf16():
    model = _tiny("hybrid", torch.bfloat16, residual_in_fp32=True).train()
    ckpt = _twin(model, checkpoint_every=1).train()
    x = torch.randn(2, 6, 5).to(torch.bfloat16)
    for m in (model, ckpt):
        m(x, return_sequence=True).float().pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_residual_in_fp32_and_the_one_call_step():
    """The C++ plan runs fp32/fp64 models only, where the option changes nothing: it takes a model
    with the option on, and a bf16 model (where the option acts) takes the block-by-block step."""
    from hybridssm.streaming import plan_status

    model = _tiny("mamba", residual_in_fp32=True)
    assert plan_status(model) == plan_status(_twin(model, residual_in_fp32=False))
    assert "float32" in plan_status(model.to(torch.bfloat16))


@pytest.mark.parametrize("name", MODELS)
def test_residual_in_fp32_under_autocast(name):
    """Under bf16 autocast the stream is fp32 with the option on, and the output tracks fp32."""
    model = _tiny(name, residual_in_fp32=True)
    dtypes: list = []
    for block in model.blocks:
        block.register_forward_hook(lambda m, a, out: dtypes.append(out[0].dtype))
    x = torch.randn(2, 6, 5)
    with torch.no_grad():
        ref = model(x, return_sequence=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x, return_sequence=True)
    assert set(dtypes) == {torch.float32}
    assert_close(y.float(), ref, "bf16")


# -- the Mamba options of hymba and ss_transformer ---------------------------------------------------
MAMBA_OPTIONS = ("dt_rank", "dt_min", "dt_max", "dt_init_floor", "dt_init", "conv_bias", "proj_bias")
SET = dict(dt_rank=3, dt_min=0.01, dt_max=0.02, dt_init_floor=0.015, dt_init="constant",
           conv_bias=False, proj_bias=True)


@pytest.mark.parametrize("name", ["hymba", "ss_transformer"])
def test_mamba_path_options_have_mambas_names_and_defaults(name):
    ref, cfg = hs.MambaConfig(embed_dim=4), hs.get_config_class(name)(embed_dim=4)
    assert [getattr(cfg, k) for k in MAMBA_OPTIONS] == [getattr(ref, k) for k in MAMBA_OPTIONS]
    default = _tiny(name).blocks[0].ssm
    assert default.ssm.dt_rank == 1 and default.conv.bias is not None and default.in_proj.bias is None


@pytest.mark.parametrize("name", ["hymba", "ss_transformer"])
def test_mamba_path_options_reach_the_mixer(name):
    model = _tiny(name, **SET)
    for block in model.blocks:
        m = block.ssm
        assert isinstance(m, MambaMixer)
        assert m.ssm.dt_rank == 3 and m.ssm.dt_proj.weight.shape == (32, 3)
        assert torch.all(m.ssm.dt_proj.weight == 3**-0.5)  # "constant"
        dt = F.softplus(m.ssm.dt_bias)
        assert dt.min() >= 0.015 - 1e-6 and dt.max() <= 0.02 + 1e-6  # the range, floored
        assert m.conv.bias is None and m.in_proj.bias is not None and m.out_proj.bias is not None
    opts = fit_options(name, TINY_RES)
    assert hs.param_count(name, **opts, **SET) == sum(p.numel() for p in model.parameters())
    # per layer (d = 16, E = 32): x_proj and dt_proj gain 2 rank columns each (+64, +64), the
    # conv loses its bias (-32), in_proj and out_proj gain theirs (+64, +16)
    assert hs.param_count(name, **opts, **SET) - hs.param_count(name, **opts) == 2 * 176


def test_ss_transformer_mamba2_path_takes_the_shared_options_and_refuses_mamba1s():
    opts = dict(ssm="mamba2", dt_min=0.01, dt_max=0.02, dt_init_floor=0.015, conv_bias=False,
                proj_bias=True)
    model = _tiny("ss_transformer", **opts)
    m = model.blocks[0].ssm
    assert isinstance(m, Mamba2Mixer) and m.in_proj.bias is not None
    assert m.conv1d.bias is None
    assert _tiny("ss_transformer", ssm="mamba2").blocks[0].ssm.conv1d.bias is not None
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 0.015 - 1e-6 and dt.max() <= 0.02 + 1e-6
    tiny = fit_options("ss_transformer", {**TINY_RES, **opts})
    assert hs.param_count("ss_transformer", **tiny) == sum(p.numel() for p in model.parameters())
    for bad, shown in ((dict(dt_rank=3), "'dt_rank'=3"), (dict(dt_init="constant"), "'dt_init'='constant'")):
        with pytest.raises(ValueError, match=f"{shown} changes nothing with ssm='mamba2'"):
            hs.build("ss_transformer", embed_dim=4, ssm="mamba2", **bad)


@pytest.mark.parametrize("name", ["hymba", "ss_transformer"])
@pytest.mark.parametrize("opts, match", [
    (dict(dt_rank=0), "'dt_rank' must be a positive integer.*or None, got 0"),
    (dict(dt_min=0.2), "'dt_min'=0.2 and 'dt_max'=0.1: need dt_min <= dt_max"),
    (dict(dt_init="normal"), "'dt_init' must be one of 'random', 'constant'; got 'normal'"),
    (dict(proj_bias=None), "'proj_bias' must be True or False, got None"),
])
def test_mamba_path_bad_values(name, opts, match):
    with pytest.raises(ValueError, match=match):
        hs.get_config_class(name)(embed_dim=4, **opts)


# -- the Mamba-2 options of ss_transformer (ssm="mamba2") and hybrid (backbone="mamba2") -----------
MAMBA2_OWN = ("ssm_head_dim", "num_groups", "scan_chunk_size", "A_init_range", "dt_limit",
              "D_has_hdim", "norm_before_gate")
# non-default values of every Mamba-2 option (tiny widths: d = 16, E = 32, P = 4: H = 8 heads)
SET2 = dict(ssm_head_dim=4, num_groups=2, scan_chunk_size=5, A_init_range=(2.0, 3.0),
            dt_limit=(0.01, 0.5), D_has_hdim=True, norm_before_gate=True, dt_min=0.01,
            dt_max=0.02, dt_init_floor=0.015, conv_bias=False, proj_bias=True)
# three layers, two of them Mamba-2 in the hybrid (attention_every=3)
TINY2 = dict(TINY_RES, num_layers=3, attention_every=3)


def _mamba2_opts(name: str, **opts) -> dict:
    """``opts`` as the Mamba-2 path's options of ``name``: ss_transformer's own (ssm="mamba2"),
    the hybrid's ``backbone_options`` (backbone="mamba2")."""
    if name == "hybrid":
        return dict(backbone="mamba2", backbone_options=opts)
    return dict(ssm="mamba2", **opts)


def _tiny2(name: str, **opts):
    return _tiny(name, **{**TINY2, **_mamba2_opts(name, **opts)})


def test_mamba2_path_options_have_mamba2s_names_and_defaults():
    assert tuple(own_options(Mamba2Options)) == MAMBA2_OWN
    ref = hs.Mamba2Config(embed_dim=4)
    ss = hs.SSTransformerConfig(embed_dim=4, ssm="mamba2")
    spec = get_backbone("mamba2").options
    for name in (*MAMBA2_OWN, "dt_min", "dt_max", "dt_init_floor", "conv_bias", "proj_bias"):
        assert getattr(ss, name) == getattr(ref, name) == spec[name], name
    assert ss.mamba2_options() == ref.mamba2_options()
    assert spec["norm_eps"] == ref.mamba2_options()["norm_eps"] == 1e-5


@pytest.mark.parametrize("name", ["ss_transformer", "hybrid"])
def test_mamba2_options_reach_every_mamba2_mixer(name):
    model = _tiny2(name, **SET2)
    mixers = [m for m in model.modules() if isinstance(m, Mamba2Mixer)]
    assert len(mixers) == (3 if name == "ss_transformer" else 2)
    for m in mixers:
        assert (m.head_dim, m.num_heads, m.num_groups, m.scan_chunk_size) == (4, 8, 2, 5)
        A = torch.exp(m.A_log)
        assert A.min() >= 2.0 - 1e-6 and A.max() <= 3.0 + 1e-6
        assert m.dt_limit == (0.01, 0.5)
        assert m.D.shape == (32,) and m.norm.norm_before_gate and m.norm.groups == 2
        dt = F.softplus(m.dt_bias)
        assert dt.min() >= 0.015 - 1e-6 and dt.max() <= 0.02 + 1e-6  # the range, floored
        assert m.conv1d.bias is None and m.in_proj.bias is not None and m.out_proj.bias is not None
    # the model's norm_eps is the gated norm's on ss_transformer (as on mamba2); the hybrid's
    # backbone takes its own in backbone_options
    if name == "ss_transformer":
        assert _tiny2(name, norm_eps=1e-3).blocks[0].ssm.norm.eps == 1e-3
    else:
        assert _tiny2(name, norm_eps=1e-3).blocks[0].mixer.norm.eps == 1e-3


@pytest.mark.parametrize("name", ["ss_transformer", "hybrid"])
def test_mamba2_options_param_count_is_exact(name):
    model = _tiny2(name, **SET2)
    opts = fit_options(name, {**TINY2, **_mamba2_opts(name, **SET2)})
    assert hs.param_count(name, **opts) == sum(p.numel() for p in model.parameters())
    sizes = dict(ssm_head_dim=4, num_groups=2)
    base = fit_options(name, {**TINY2, **_mamba2_opts(name, **sizes)})
    # per Mamba-2 layer (d = 16, E = 32, H = 8, conv over E + 2GN = 48 channels): D per channel
    # (+24), no conv bias (-48), in_proj's bias over z, xBC, dt (+88) and out_proj's (+16)
    layers = 3 if name == "ss_transformer" else 2
    assert hs.param_count(name, **opts) - hs.param_count(name, **base) == layers * 80


@pytest.mark.parametrize("name", ["ss_transformer", "hybrid"])
@torch.no_grad()
@pytest.mark.parametrize("fused", [True, False], ids=["one_call", "block_by_block"])
def test_mamba2_options_step_equals_forward(name, fused):
    """D_has_hdim, norm_before_gate, dt_limit and proj_bias each take the one-call step (its kernel
    has them); both it and the block-by-block step equal the forward."""
    from hybridssm.streaming import plan_status

    assert plan_status(_tiny2(name, ssm_head_dim=4)) == "fused"
    for one in ("D_has_hdim", "norm_before_gate", "dt_limit", "proj_bias"):
        assert plan_status(_tiny2(name, **{one: SET2[one]})) == "fused", one
    model = _tiny2(name, **SET2)
    model.use_fused_step = fused
    x = torch.randn(2, 9, 5)
    full = model(x, return_sequence=True)
    state = model.init_state(2)
    ys = [model.step(x[:, t], state, inplace=True)[0] for t in range(9)]
    assert_close(torch.stack(ys, 1), full)
    head, state = model(x[:, :4], return_sequence=True, return_state=True)
    tail = [model.step(x[:, t], state)[0] for t in range(4, 5)]
    assert_close(torch.cat([head, torch.stack(tail, 1)], 1), full[:, :5])


@pytest.mark.parametrize("name", ["ss_transformer", "hybrid"])
def test_mamba2_options_save_and_load(name, tmp_path):
    model = _tiny2(name, **SET2)
    model.save_pretrained(tmp_path)
    loaded = hs.load(tmp_path)
    assert loaded.config == model.config
    x = torch.randn(2, 6, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x, return_sequence=True), model(x, return_sequence=True))


@pytest.mark.parametrize("name", ["ss_transformer", "hybrid"])
@pytest.mark.parametrize("opts, match", [
    (dict(A_init_range=(0.0, 16.0)), "'A_init_range' must be a pair \\(lo, hi\\) with 0 < lo <= hi"),
    (dict(dt_limit=(0.1, 0.1)), "'dt_limit' must be a pair \\(lo, hi\\) with 0 <= lo < hi"),
    (dict(D_has_hdim="yes"), "'D_has_hdim' must be True or False, got 'yes'"),
    (dict(norm_before_gate=0), "'norm_before_gate' must be True or False, got 0"),
    (dict(num_groups=0), "'num_groups' must be a positive integer"),
    (dict(scan_chunk_size=-1), "'scan_chunk_size' must be a positive integer"),
    (dict(ssm_head_dim=0), "'ssm_head_dim' must be a positive integer.*or None, got 0"),
])
def test_mamba2_path_bad_values_fail_with_the_config(name, opts, match):
    cfg = hs.get_config_class(name)
    with pytest.raises(ValueError, match=match):
        cfg(embed_dim=4, **_mamba2_opts(name, **opts))


def test_mamba2_path_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="'ssm_head_dim' must divide d_inner .* = 32, got 5"):
        hs.SSTransformerConfig(**fit_options("ss_transformer", TINY_RES), ssm="mamba2",
                               ssm_head_dim=5)
    with pytest.raises(ValueError, match="'num_groups' must divide the number of heads .* = 8, got 3"):
        hs.build("hybrid", **fit_options("hybrid", TINY_RES), backbone="mamba2",
                 backbone_options=dict(ssm_head_dim=4, num_groups=3))  # needs the width: on build


@pytest.mark.parametrize("option", MAMBA2_OWN)
def test_mamba2_options_that_change_nothing_are_refused(option):
    value = SET2[option]
    with pytest.raises(ValueError, match=f"'{option}'=.* changes nothing with ssm='mamba' "
                                         "\\(an option of the 'mamba2' path\\)"):
        hs.build("ss_transformer", embed_dim=4, **{option: value})
    for backbone in ("mamba", "gated_ssm"):
        with pytest.raises(TypeError, match=f"backbone '{backbone}' got an unknown option '{option}'"):
            hs.build("hybrid", embed_dim=4, backbone=backbone, backbone_options={option: value})
    with pytest.raises(TypeError, match=f"unknown option '{option}'"):
        hs.build("hybrid", embed_dim=4, backbone="mamba2", **{option: value})  # a backbone option
