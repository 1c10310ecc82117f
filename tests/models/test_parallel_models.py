"""SSTransformer and Hymba beyond conformance: the gate mixes, meta tokens behave as documented."""

from __future__ import annotations

import pytest
import torch

import hybridssm as hs
from helpers import assert_close
from hybridssm.blocks import GateFusion, MeanFusion, ParallelBlock

TINY = dict(embed_dim=5, hidden_size=16, num_layers=2, state_size=4, num_heads=2, dropout=0.0)


def _model(name, **kw):
    torch.manual_seed(0)
    opts = {**TINY, **kw}
    if name == "ss_transformer":
        opts["head_dim"] = 8
    return hs.build(name, **opts).eval()


@pytest.mark.parametrize("name", ["ss_transformer", "hymba"])
@pytest.mark.parametrize("gate_value", [1.0, 0.0])
@torch.no_grad()
def test_forced_gate_selects_one_path(name, gate_value):
    model = _model(name)
    block: ParallelBlock = model.blocks[0]
    assert isinstance(block.fusion, GateFusion)
    block.fusion.gate.weight.zero_()
    block.fusion.gate.bias.fill_(1e4 if gate_value == 1.0 else -1e4)  # sigmoid saturates exactly
    x = torch.randn(2, 7, 16)
    if name == "hymba":  # the attention path needs its meta tokens in front
        x = torch.cat([model.meta_embedding.expand(2, -1, -1), x], 1)
    y, _ = block(x)
    h = block.norm(x)
    fusion = block.fusion
    if gate_value == 1.0:
        path = block.ssm(h)[0]
        path = fusion.ssm_norm(path) if fusion.normalize else path
    else:
        path = block.attn(h)[0]
        path = fusion.attn_norm(path) if fusion.normalize else path
    expected = block.ffn(x + path)
    assert_close(y, expected)


def test_gate_fusion_normalises_each_path_only_where_asked():
    """ss_transformer keeps the seed's raw gate; Hymba normalises each path (the paper's fusion)."""
    assert not _model("ss_transformer").blocks[0].fusion.normalize
    assert _model("hymba").blocks[0].fusion.normalize
    assert not _model("hymba", fusion_norm=False).blocks[0].fusion.normalize
    assert _model("hymba", fusion="mean").blocks[0].fusion.normalize
    assert not _model("hymba", fusion="mean", fusion_norm=False).blocks[0].fusion.normalize
    assert _model("ss_transformer", fusion_norm=True).blocks[0].fusion.normalize
    assert _model("ss_transformer", fusion="mean").blocks[0].fusion.normalize
    assert not _model("ss_transformer", fusion="mean", fusion_norm=False).blocks[0].fusion.normalize


@torch.no_grad()
def test_normalised_gate_fusion_formula_and_scale_invariance():
    torch.manual_seed(0)
    fusion = GateFusion(16, normalize=True)
    fusion.ssm_norm.weight.uniform_(0.5, 1.5)  # the per-channel betas are used
    fusion.attn_norm.weight.uniform_(0.5, 1.5)
    h, ssm, attn = torch.randn(3, 2, 5, 16).unbind(0)
    g = torch.sigmoid(fusion.gate(h))
    expected = g * fusion.ssm_norm(ssm) + (1 - g) * fusion.attn_norm(attn)
    assert_close(fusion(h, ssm, attn), expected)
    # What the normalisation is for: a path's raw magnitude no longer decides its share.
    assert_close(fusion(h, 0.5 * ssm, 40.0 * attn), expected)  # (x0.5: RMSNorm eps stays negligible)
    raw = GateFusion(16)
    assert not hasattr(raw, "ssm_norm")
    assert_close(raw(h, ssm, attn), torch.sigmoid(raw.gate(h)) * (ssm - attn) + attn)


@torch.no_grad()
def test_unnormalised_mean_fusion_is_the_plain_average():
    fusion = MeanFusion(16, normalize=False)
    h, ssm, attn = torch.randn(3, 1, 4, 16).unbind(0)
    assert_close(fusion(h, ssm, attn), 0.5 * (ssm + attn))


def test_hymba_fusion_norm_parameters_are_counted():
    d, L = TINY["hidden_size"], TINY["num_layers"]
    opts = {k: v for k, v in TINY.items()}
    with_norm = hs.param_count("hymba", **opts)
    without = hs.param_count("hymba", **opts, fusion_norm=False)
    assert with_norm - without == 2 * d * L  # two per-channel gain vectors per block
    assert with_norm == sum(p.numel() for p in _model("hymba").parameters())
    ss = {**TINY, "head_dim": 8}
    ss_norm = hs.param_count("ss_transformer", **ss, fusion_norm=True)
    assert ss_norm - hs.param_count("ss_transformer", **ss) == 2 * d * L
    assert ss_norm == sum(p.numel() for p in _model("ss_transformer", fusion_norm=True).parameters())


@pytest.mark.parametrize("name", ["ss_transformer", "hymba"])
@torch.no_grad()
def test_mean_fusion_option(name):
    fusion = _model(name, fusion="mean").blocks[0].fusion
    assert isinstance(fusion, MeanFusion)
    h, ssm, attn = torch.randn(3, 1, 4, 16).unbind(0)
    assert_close(fusion(h, ssm, attn), 0.5 * (fusion.attn_norm(attn) + fusion.ssm_norm(ssm)))


def test_ss_transformer_ssm_choice_uses_the_shared_mixers():
    assert isinstance(_model("ss_transformer").blocks[0].ssm, hs.MambaMixer)
    assert isinstance(_model("ss_transformer", ssm="mamba2").blocks[0].ssm, hs.Mamba2Mixer)
    with pytest.raises(ValueError, match="'ssm' must be one of 'mamba', 'mamba2'; got 's4'"):
        hs.build("ss_transformer", embed_dim=4, ssm="s4")


def test_ss_transformer_seed_defaults():
    cfg = hs.SSTransformerConfig(embed_dim=256)
    assert (cfg.hidden_size, cfg.state_size, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (
        256, 16, 6, 4, 64,
    )
    assert (cfg.expand_factor, cfg.conv_size, cfg.dropout, cfg.window_size) == (2, 4, 0.1, 60)


def test_hymba_seed_defaults_and_default_values():
    cfg = hs.HymbaConfig(embed_dim=287)
    assert (cfg.hidden_size, cfg.state_size, cfg.num_layers, cfg.num_heads, cfg.num_meta_tokens) == (
        256, 16, 4, 4, 4,
    )
    assert cfg.dropout == 0.0 and cfg.window_size == 60 and cfg.global_layers is None
    assert hs.HymbaConfig.default_num_meta_tokens == 4 and hs.HymbaConfig.default_dropout == 0.0
    assert cfg.attn_head_dim == 64
    assert hs.recommended_defaults("hymba")["dropout"] == 0.1


@torch.no_grad()
def test_changing_a_meta_token_changes_every_output():
    model = _model("hymba")
    x = torch.randn(2, 9, 5)
    before = model(x, return_sequence=True)
    model.meta_embedding[1, 3] += 0.5
    after = model(x, return_sequence=True)
    assert ((after - before).abs().amax(-1) > 1e-6).all()
    # init_state follows the parameter change (its cache is invalidated)
    state = model.init_state(2)
    ys = []
    for t in range(9):
        y, state = model.step(x[:, t], state)
        ys.append(y)
    assert_close(torch.stack(ys, 1), after)


@torch.no_grad()
def test_meta_tokens_stay_visible_under_a_small_window():
    """Attention with prefix tokens: a window of 2 over 10 tokens still sees the 2 meta tokens."""
    mixer = hs.AttentionMixer(16, 2, 8, window_size=2, num_prefix=2).eval()
    x = torch.randn(1, 12, 16)
    base, _ = mixer(x)
    for j, visible in [(0, True), (1, True), (5, False), (10, True), (11, True)]:
        x2 = x.clone()
        x2[:, j] += 1.0
        changed = (mixer(x2)[0][:, -1] - base[:, -1]).abs().max() > 1e-6
        assert bool(changed) == visible, f"key {j}: visible={visible}"


@torch.no_grad()
def test_hymba_sliding_layers_still_use_meta_tokens_when_streaming():
    model = _model("hymba", global_layers=(), window_size=2)
    assert all(b.attn.window_size == 2 for b in model.blocks)
    x = torch.randn(1, 10, 5)
    full = model(x, return_sequence=True)
    state = model.init_state(1)
    for t in range(10):
        y, state = model.step(x[:, t], state, inplace=True)
    assert_close(y, full[:, -1])


def test_outputs_never_include_meta_positions():
    model = _model("hymba", num_meta_tokens=3)
    x = torch.randn(2, 4, 5)
    assert model(x, return_sequence=True).shape == (2, 4, 16)
    _, s = model(x, return_state=True)
    assert s.pos.tolist() == [4, 4]  # positions count inputs only
    assert model.init_state(2).pos.tolist() == [0, 0]
    assert model.init_state(2).layers[0].attn.pos.tolist() == [3, 3]  # the layer saw the meta tokens


@torch.no_grad()
def test_kv_meta_tokens_equal_attention_over_memory_and_causal_keys():
    model = _model("hymba", meta_tokens="kv", num_meta_tokens=3)
    assert model.meta_embedding is None
    attn = model.blocks[0].attn
    x = torch.randn(2, 6, 16)
    y, _ = attn(x)
    B, T, H, Dh = 2, 6, attn.num_heads, attn.head_dim
    q, k, v = attn.qkv_proj(x).view(B, T, 3, H, Dh).unbind(2)
    keys = torch.cat([attn.mem_k.expand(B, -1, -1, -1), k], 1)  # [B, M + T, H, Dh]
    vals = torch.cat([attn.mem_v.expand(B, -1, -1, -1), v], 1)
    scores = torch.einsum("bthd,bshd->bhts", q, keys) / Dh**0.5
    causal = torch.ones(T, T).tril().bool()
    mask = torch.cat([torch.ones(T, 3, dtype=torch.bool), causal], 1)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    expected = attn.o_proj(torch.einsum("bhts,bshd->bthd", probs, vals).reshape(B, T, H * Dh))
    assert_close(y, expected)


def test_hymba_bad_options():
    with pytest.raises(ValueError, match="'global_layers' must be a tuple of layer indices in 0..1"):
        hs.build("hymba", embed_dim=4, num_layers=2, global_layers=(5,))
    with pytest.raises(ValueError, match="'meta_tokens' must be one of 'sequence', 'kv'"):
        hs.build("hymba", embed_dim=4, meta_tokens="tokens")
    with pytest.raises(ValueError, match="'fusion' must be one of 'gate', 'mean'"):
        hs.build("hymba", embed_dim=4, fusion="max")
    with pytest.raises(ValueError, match="'fusion_norm' must be True or False, got 'yes'"):
        hs.build("hymba", embed_dim=4, fusion_norm="yes")
    with pytest.raises(ValueError, match="'fusion_norm' must be True or False, got 1"):
        hs.build("ss_transformer", embed_dim=4, fusion_norm=1)


def test_hymba_init_state_gradient_reaches_meta_tokens():
    model = _model("hymba").train()
    x = torch.randn(2, 5, 5)
    y, _ = model(x, return_state=True)  # through init_state: must not use a cached, detached state
    (y * torch.randn_like(y)).sum().backward()
    assert model.meta_embedding.grad is not None and model.meta_embedding.grad.abs().sum() > 0
