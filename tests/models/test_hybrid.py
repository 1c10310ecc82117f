"""The hybrid model beyond conformance: layout, layers, options, custom backbones."""

from __future__ import annotations

import pytest
import torch

import hybridssm as hs
from custom_backbone import EMAMixer
from helpers import assert_close
from hybridssm.layers import FFN, LearnedPositions, SinusoidalPositions
from hybridssm.streaming import plan_status

TINY = dict(embed_dim=5, hidden_size=16, num_heads=2, head_dim=8, state_size=4, window_size=4,
            dropout=0.0)


def test_layer_pattern_matches_the_seed_examples():
    assert hs.layer_pattern(num_layers=6, attention_every=3) == [
        "mamba", "mamba", "attention", "mamba", "mamba", "attention",
    ]
    assert hs.layer_pattern(num_layers=6, attention_every=3, backbone="gru") == [
        "gru", "gru", "attention", "gru", "gru", "attention",
    ]
    assert hs.layer_pattern(num_layers=8, attention_every=4)[3::4] == ["attention", "attention"]
    assert hs.layer_pattern(num_layers=2, attention_every=3) == ["mamba", "mamba"]
    with pytest.raises(ValueError, match="'attention_every' must be a positive integer.*0"):
        hs.layer_pattern(num_layers=6, attention_every=0)


@pytest.mark.parametrize("backbone", hs.list_backbones())
def test_model_is_built_from_its_pattern(backbone):
    model = hs.build("hybrid", **TINY, num_layers=4, attention_every=2, backbone=backbone)
    assert model.layer_pattern == [backbone, "attention", backbone, "attention"]
    for kind, block in zip(model.layer_pattern, model.blocks):
        if kind == "attention":
            assert isinstance(block.mixer, hs.AttentionMixer) and block.ffn is not None
            assert block.mixer.window_size == 4  # use_sliding_window defaults on
        elif backbone == "griffin_lru":  # the seed's Griffin layer includes its gated MLP
            assert isinstance(block.ffn.ffn, FFN) and block.ffn.ffn.activation == "geglu"
        else:
            assert not isinstance(block.mixer, hs.AttentionMixer) and block.ffn is None


def test_seed_defaults_and_recommended():
    cfg = hs.HybridConfig(embed_dim=256)
    assert (cfg.hidden_size, cfg.num_layers, cfg.attention_every, cfg.backbone) == (256, 6, 3, "mamba")
    assert (cfg.num_heads, cfg.head_dim, cfg.window_size, cfg.use_sliding_window) == (4, 64, 60, True)
    assert (cfg.qk_layernorm, cfg.pre_norm, cfg.dropout, cfg.chunk_size) == (True, True, 0.1, 32)
    assert not cfg.chunked_attention and not cfg.memory_efficient_attention
    assert cfg.positional == "none"
    assert hs.recommended_defaults("hybrid")["attention_every"] == 3
    model = hs.Hybrid(cfg)
    assert isinstance(model.blocks[0].mixer, hs.MambaMixer)  # true Mamba, not the seed's GatedSSM


@torch.no_grad()
def test_post_norm_puts_norms_after_the_residuals():
    model = hs.build("hybrid", **TINY, num_layers=2, attention_every=2, backbone="gru",
                     pre_norm=False).eval()
    x = torch.randn(2, 5, 16)
    block = model.blocks[0]
    y, _ = block(x)
    assert_close(y, block.norm(x + block.mixer(x)[0]))
    attn = model.blocks[1]
    y, _ = attn(x)
    h = attn.norm(x + attn.mixer(x)[0])
    assert_close(y, attn.ffn.norm(h + attn.ffn.ffn(h)))


@pytest.mark.parametrize("impl_opts, impl", [
    (dict(), "sdpa"),
    (dict(chunked_attention=True), "chunked"),
    (dict(memory_efficient_attention=True), "memory_efficient"),
])
@torch.no_grad()
def test_attention_implementations_agree(impl_opts, impl):
    torch.manual_seed(0)
    ref = hs.build("hybrid", **TINY, num_layers=2, attention_every=2, backbone="gru",
                   use_sliding_window=False).eval()
    torch.manual_seed(0)
    model = hs.build("hybrid", **TINY, num_layers=2, attention_every=2, backbone="gru",
                     use_sliding_window=False, chunk_size=3, **impl_opts).eval()
    assert model.blocks[1].mixer.impl == impl
    x = torch.randn(2, 11, 5)
    assert_close(model(x, return_sequence=True), ref(x, return_sequence=True))


def test_exclusive_attention_options():
    with pytest.raises(ValueError, match="exclusive"):
        hs.build("hybrid", embed_dim=4, chunked_attention=True, memory_efficient_attention=True)


@pytest.mark.parametrize("positional, cls", [("sinusoidal", SinusoidalPositions),
                                             ("learned", LearnedPositions), ("rope", None)])
@torch.no_grad()
def test_positional_options_stream_exactly(positional, cls):
    model = hs.build("hybrid", **TINY, num_layers=2, attention_every=2, backbone="gru",
                     positional=positional, max_positions=16).eval()
    if cls is None:
        assert model.positional is None and model.blocks[1].mixer.positional == "rope"
    else:
        assert isinstance(model.positional, cls)
    x = torch.randn(2, 9, 5)
    full = model(x, return_sequence=True)
    state = model.init_state(2)
    for t in range(9):
        y, state = model.step(x[:, t], state)
    assert_close(y, full[:, -1])


def test_learned_positions_past_capacity_name_the_option():
    model = hs.build("hybrid", **TINY, num_layers=2, attention_every=2, backbone="gru",
                     positional="learned", max_positions=4)
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.randn(1, 5, 5))


def test_backbone_options_are_validated():
    with pytest.raises(TypeError, match="unknown option 'head_dm'.*did you mean 'head_dim'"):
        hs.build("hybrid", embed_dim=4, backbone="rwkv", backbone_options={"head_dm": 8})
    with pytest.raises(ValueError, match="'state_size' is a model option"):
        hs.build("hybrid", embed_dim=4, backbone="mamba", backbone_options={"state_size": 8})
    with pytest.raises(ValueError, match="'backbone' must be one of.*did you mean 'mamba'"):
        hs.build("hybrid", embed_dim=4, backbone="mambo")
    model = hs.build("hybrid", **TINY, num_layers=1, backbone="rwkv", backbone_options={"head_dim": 8})
    assert model.blocks[0].mixer.head_dim == 8 if hasattr(model.blocks[0].mixer, "head_dim") else True


def test_seed_options_reach_backbones_that_take_them():
    model = hs.build("hybrid", **{**TINY, "state_size": 3}, num_layers=1, conv_size=2)
    assert model.blocks[0].mixer.init_state(1).ssm.shape[-1] == 3
    assert model.blocks[0].mixer.init_state(1).conv.shape[-1] == 1


def test_build_layer_gives_one_residual_layer():
    layer = hs.build_layer("gru", hidden_size=32)
    assert isinstance(layer, hs.ResidualBlock) and isinstance(layer.mixer, hs.GRUMixer)
    attn = hs.build_layer("attention", hidden_size=32, num_heads=2, head_dim=16)
    assert isinstance(attn.mixer, hs.AttentionMixer) and isinstance(attn.ffn.ffn, FFN)
    y, state = layer(torch.randn(2, 3, 32), layer.init_state(2))
    assert y.shape == (2, 3, 32)


def test_custom_backbone_registered_saves_and_loads_by_name(tmp_path):
    model = hs.build("hybrid", **TINY, num_layers=3, backbone="ema",
                     backbone_options={"init_decay": 0.5}).eval()
    assert isinstance(model.blocks[0].mixer, EMAMixer)
    loaded = hs.load(model.save_pretrained(tmp_path / "m")).eval()
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.config.backbone_options == {"init_decay": 0.5}


def test_unregistered_factory_works_in_memory_and_asks_to_register_on_save(tmp_path):
    def factory(hidden_size, *, init_decay=0.9):
        return EMAMixer(hidden_size, init_decay=init_decay)

    model = hs.build("hybrid", **TINY, num_layers=2, attention_every=2, backbone=factory)
    assert model.layer_pattern == ["custom", "attention"]  # the seed's name for a custom backbone
    assert hs.layer_pattern(3, 3, factory) == ["custom", "custom", "attention"]
    assert model(torch.randn(1, 3, 5)).shape == (1, 16)
    with pytest.raises(ValueError, match="register_backbone"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_builtin_backbones_cannot_be_replaced():
    with pytest.raises(ValueError, match="built in"):
        hs.register_backbone("mamba", EMAMixer)
    with pytest.raises(ValueError, match="reserved"):
        hs.register_backbone("attention", EMAMixer)


# -- seed fidelity: dropout inside every layer, options the seed passes to backbones -------------
def _two_training_calls(module, x):
    module.train()
    torch.manual_seed(0)
    return [module(x)[0] for _ in range(2)]


def test_dropout_applies_inside_every_layer_not_between_layers():
    model = hs.build("hybrid", **{**TINY, "dropout": 0.5}, num_layers=3, attention_every=3,
                     backbone="gru")
    assert model.dropout.p == 0.0  # nothing between the layers: the identity path is never dropped
    assert all(block.dropout.p == 0.5 for block in model.blocks)
    attn = model.blocks[2]
    assert attn.ffn.dropout.p == 0.5
    # with the attention's and FFN's outputs zeroed the layer is the identity, whatever is dropped
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        for p in (*attn.mixer.o_proj.parameters(), *attn.ffn.ffn.down.parameters()):
            p.zero_()
        attn.train()
        assert torch.equal(attn(x)[0], x)


def test_dropout_form_is_the_seeds_output_dropped_then_added():
    block = hs.build_layer("gru", hidden_size=8, dropout=0.5)
    x = torch.randn(3, 5, 8)
    block.train()
    torch.manual_seed(7)
    got = block(x)[0]
    torch.manual_seed(7)
    y, _ = block.mixer(block.norm(x))
    want = x + torch.nn.functional.dropout(y, 0.5, training=True)
    assert_close(got, want)


def test_build_layer_dropout_takes_effect():
    layer = hs.build_layer("gru", hidden_size=16, dropout=0.3)
    x = torch.randn(2, 6, 16)
    a, b = _two_training_calls(layer, x)
    assert not torch.equal(a, b)  # two training calls differ
    layer.eval()
    assert torch.equal(layer(x)[0], layer(x)[0])
    a, b = _two_training_calls(hs.build_layer("gru", hidden_size=16, dropout=0.0), x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backbone", ["rwkv", "delta_net", "gated_delta_net"])
def test_model_num_heads_reaches_the_backbones_the_seed_gives_it(backbone):
    opts = dict(TINY, num_heads=4, num_layers=1, backbone=backbone)
    assert hs.build("hybrid", **opts).blocks[0].mixer.num_heads == 4
    # an explicit backbone_options value wins (num_heads, or a head_dim)
    model = hs.build("hybrid", **opts, backbone_options={"num_heads": 2})
    assert model.blocks[0].mixer.num_heads == 2
    model = hs.build("hybrid", **opts, backbone_options={"head_dim": 16})
    assert model.blocks[0].mixer.head_dim == 16


def test_rwkv_num_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="'num_heads' of the rwkv backbone.*hidden_size=16.*3"):
        hs.build("hybrid", **{**TINY, "num_heads": 3}, num_layers=1, backbone="rwkv")


def test_griffin_layer_param_count_includes_its_gated_mlp():
    opts = dict(TINY, num_layers=1, backbone="griffin_lru")
    model = hs.build("hybrid", **opts)
    d = 16
    # norm (2d) + gate and up (d x 3d + 3d each) + down (3d x d + d)
    mlp = sum(p.numel() for p in model.blocks[0].ffn.parameters())
    assert mlp == 2 * d + 2 * (3 * d * d + 3 * d) + 3 * d * d + d
    assert hs.param_count("hybrid", **opts) == sum(p.numel() for p in model.parameters())


def test_init_state_defaults_to_one_row_as_the_seed():
    assert hs.build("hybrid", **TINY, num_layers=2, attention_every=2).init_state().batch_size == 1


# -- layout options: attention_offset (Jamba), explicit layer_pattern ------------------------------
def test_attention_offset_is_jambas_rule():
    assert hs.layer_pattern(8, 4, attention_offset=1) == [
        "mamba", "attention", "mamba", "mamba", "mamba", "attention", "mamba", "mamba",
    ]
    model = hs.build("hybrid", **TINY, num_layers=4, attention_every=2, attention_offset=0,
                     backbone="gru")
    assert model.layer_pattern == ["attention", "gru", "attention", "gru"]
    with pytest.raises(ValueError, match="'attention_offset' must be an integer in 0.*= 1.*got 2"):
        hs.build("hybrid", **TINY, attention_every=2, attention_offset=2)


def test_explicit_layer_pattern_is_built_and_saved(tmp_path):
    pattern = ["attention", "gru", "gru", "attention"]
    model = hs.build("hybrid", **TINY, num_layers=4, backbone="gru", layer_pattern=pattern).eval()
    assert model.layer_pattern == pattern
    loaded = hs.load(model.save_pretrained(tmp_path / "m")).eval()
    assert loaded.layer_pattern == pattern
    x = torch.randn(1, 3, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="'layer_pattern' has 4 layers but num_layers=6"):
        hs.build("hybrid", embed_dim=4, backbone="gru", layer_pattern=pattern)
    with pytest.raises(ValueError, match="'layer_pattern' must be a list of .*'attention', 'gru'"):
        hs.build("hybrid", embed_dim=4, num_layers=1, backbone="gru", layer_pattern=["mamba"])
    with pytest.raises(ValueError, match="change nothing with an explicit 'layer_pattern'"):
        hs.build("hybrid", embed_dim=4, num_layers=4, backbone="gru", layer_pattern=pattern,
                 attention_every=2)


# -- Jamba's layer options: an FFN after every layer, bias-free projections, inner dt/B/C norms ---
JAMBA = dict(TINY, num_layers=2, attention_every=2, backbone_ffn=True, attention_bias=False,
             ffn_bias=False, ffn_hidden_size=24, ffn_activation="swiglu", qk_layernorm=False,
             use_sliding_window=False, norm="rmsnorm")


def test_backbone_ffn_and_bias_free_layers_as_jamba():
    model = hs.build("hybrid", **JAMBA).eval()
    assert model.layer_pattern == ["mamba", "attention"]
    for block in model.blocks:  # every layer: norm -> mixer -> residual, norm -> FFN -> residual
        ffn = block.ffn.ffn
        assert isinstance(ffn, FFN) and ffn.up.out_features == 24
        assert ffn.up.bias is None and ffn.gate.bias is None and ffn.down.bias is None
    attn = model.blocks[1].mixer
    assert attn.qkv_proj.bias is None and attn.o_proj.bias is None
    block, x = model.blocks[0], torch.randn(2, 3, 16)
    with torch.no_grad():
        h = x + block.mixer(block.norm(x))[0]
        assert_close(block(x)[0], h + block.ffn.ffn(block.ffn.norm(h)))
    assert hs.param_count("hybrid", **JAMBA) == sum(p.numel() for p in model.parameters())
    # the defaults stay the seed's: no FFN on backbone layers, biases everywhere
    seed = hs.build("hybrid", **TINY, num_layers=2, attention_every=2)
    assert seed.blocks[0].ffn is None and seed.blocks[1].mixer.qkv_proj.bias is not None
    assert seed.blocks[1].ffn.ffn.up.out_features == 64 and seed.blocks[1].ffn.ffn.up.bias is not None


def test_jamba_layer_options_are_validated():
    with pytest.raises(ValueError, match="'backbone_ffn'=True: the 'griffin_lru' backbone's layer "
                                         "already includes its own MLP"):
        hs.build("hybrid", **TINY, backbone="griffin_lru", backbone_ffn=True)
    with pytest.raises(ValueError, match="'ffn_multiplier'=2 changes nothing with ffn_hidden_size=24"):
        hs.build("hybrid", **TINY, ffn_multiplier=2, ffn_hidden_size=24)
    with pytest.raises(ValueError, match="'ffn_hidden_size'"):
        hs.build("hybrid", **TINY, ffn_hidden_size=0)
    for name in ("backbone_ffn", "attention_bias", "ffn_bias"):
        with pytest.raises(ValueError, match=f"option '{name}' must be True or False, got 1"):
            hs.build("hybrid", **TINY, **{name: 1})


@pytest.mark.parametrize("inner_norms", [False, True])
def test_jamba_layers_stream_exactly(inner_norms):
    # bias-free layers, with or without the inner norms, take the one-call fused step
    torch.manual_seed(0)
    model = hs.build("hybrid", **JAMBA, backbone_options={"inner_norms": inner_norms}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    assert plan_status(model) == "fused"
    x = torch.randn(2, 7, 5)
    with torch.no_grad():
        want = model(x, return_sequence=True)
        state = model.init_state(2)
        for t in range(7):
            y, state = model.step(x[:, t], state, inplace=True)
            assert_close(y, want[:, t])
