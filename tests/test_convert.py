"""hs.from_transformers: small random transformers Mamba / Mamba-2 / Jamba models (built locally,
no download) converted, then compared on forward, step, a greedy continuation and save/load."""

from __future__ import annotations

import pytest
import torch

import hybridssm as hs
from helpers import assert_close
from hybridssm.streaming import plan_status

transformers = pytest.importorskip("transformers")

VOCAB = 40


def _mamba(**over):
    cfg = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, conv_kernel=3, expand=2,
        **over,
    )
    torch.manual_seed(0)
    return transformers.MambaForCausalLM(cfg).eval()


def _mamba2(**over):
    opts = dict(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2, conv_kernel=3,
                expand=2, num_heads=4, head_dim=8, n_groups=2, chunk_size=8)
    torch.manual_seed(0)
    return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**{**opts, **over})).eval()


def _jamba(**over):
    # attention at layers 1 and 3 (period 2, offset 1), dense FFNs, grouped kv heads
    opts = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, num_experts=1, attn_layer_period=2,
                attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2,
                mamba_dt_rank=3, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    return transformers.JambaForCausalLM(transformers.JambaConfig(**{**opts, **over})).eval()


SOURCES = {
    "mamba": _mamba,
    "mamba_biases": lambda: _mamba(use_bias=True, use_conv_bias=False, layer_norm_epsilon=1e-3,
                                   time_step_rank=3),
    "mamba2": _mamba2,
    "mamba2_options": lambda: _mamba2(use_bias=True, time_step_limit=(0.01, 0.05), n_groups=1),
    "jamba": _jamba,
    # the other layout, biased Mamba projections, no conv bias, "auto" dt rank, tied embeddings
    # (they stay with the source: nothing to convert)
    "jamba_options": lambda: _jamba(attn_layer_period=3, attn_layer_offset=0, num_hidden_layers=3,
                                    num_key_value_heads=4, mamba_proj_bias=True,
                                    mamba_conv_bias=False, mamba_dt_rank="auto",
                                    tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def pair(request):
    hf = SOURCES[request.param]()
    with torch.no_grad():  # perturb the norms and biases so that none is trivially 1 or 0
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return hf, hs.from_transformers(hf)


def _embeds(hf, ids):
    return hf.get_input_embeddings()(ids).detach()


@torch.no_grad()
def test_forward_equals_last_hidden_state(pair):
    hf, model = pair
    assert isinstance(model.input_proj, torch.nn.Identity)
    assert model.config.norm == "rmsnorm"
    x = _embeds(hf, torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1)))
    assert_close(model(x, return_sequence=True), hf.base_model(inputs_embeds=x).last_hidden_state)


@torch.no_grad()
def test_steps_equal_the_source_at_every_position(pair):
    hf, model = pair
    x = _embeds(hf, torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2)))
    want = hf.base_model(inputs_embeds=x).last_hidden_state
    state = model.init_state(2)
    for t in range(7):
        y, state = model.step(x[:, t], state, inplace=True)
        assert_close(y, want[:, t])


@torch.no_grad()
def test_greedy_continuation_through_the_sources_embedding_and_head(pair):
    hf, model = pair
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    # no end-of-sequence token: generate's greedy argmax over every token, 20 of them
    hf.generation_config.eos_token_id = None
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                       do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert len(want) == 20
    h, state = model(_embeds(hf, prompt), return_state=True)
    tokens = []
    for _ in range(20):
        tok = int(hf.lm_head(h).argmax(-1))
        tokens.append(tok)
        h, state = model.step(_embeds(hf, torch.tensor([[tok]]))[:, 0], state)
    assert tokens == want


def test_saves_loads_and_converts_from_a_saved_directory(pair, tmp_path):
    hf, model = pair
    hf.save_pretrained(tmp_path / "hf")
    again = hs.from_transformers(tmp_path / "hf")
    loaded = hs.load(model.save_pretrained(tmp_path / "ours")).eval()
    x = _embeds(hf, torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
        assert torch.equal(loaded(x), model(x))


def test_jamba_maps_onto_a_hybrid_with_its_layout_and_options():
    hf = _jamba()
    model = hs.from_transformers(hf.model)  # the bare JambaModel converts as well
    c = model.config
    assert c.kinds == ["mamba", "attention", "mamba", "attention"] == [
        "attention" if k == "attention" else "mamba" for k in hf.config.layers_block_type]
    assert (c.num_kv_heads, c.attn_head_dim, c.ffn_hidden_size, c.norm_eps) == (2, 4, 24, 1e-5)
    assert c.backbone_options["inner_norms"] and c.backbone_options["inner_norm_eps"] == 1e-5
    assert c.backbone_ffn and not (c.attention_bias or c.ffn_bias or c.qk_layernorm)
    assert all(block.ffn is not None for block in model.blocks)
    assert plan_status(model) == "fused"  # the one-call step covers every Jamba layer
    assert hs.param_count("hybrid", **c.to_dict()) == sum(p.numel() for p in hf.model.parameters()) - (
        hf.model.embed_tokens.weight.numel())


@pytest.mark.parametrize("make", [_mamba, _mamba2], ids=["mamba", "mamba2"])
@pytest.mark.parametrize("fp32", [True, False])
def test_residual_in_fp32_follows_the_source(make, fp32):
    # it acts in bf16 only, where a model converted with the other value would drift from its source
    assert hs.from_transformers(make(residual_in_fp32=fp32)).config.residual_in_fp32 is fp32


def test_what_has_no_equivalent_is_named():
    with pytest.raises(ValueError, match="hidden_act='gelu' has no equivalent"):
        hs.from_transformers(_mamba(hidden_act="gelu"))
    with pytest.raises(ValueError, match="hidden_act='gelu' has no equivalent"):
        hs.from_transformers(_jamba(hidden_act="gelu"))
    moe = _jamba(num_experts=2, expert_layer_period=2, expert_layer_offset=1)
    with pytest.raises(ValueError, match=r"mixture-of-experts layers \(num_experts=2 on layers "
                                         r"\[1, 3\]\) have no equivalent"):
        hs.from_transformers(moe)
    with pytest.raises(ValueError, match="model_type 'llama'.*supported: 'mamba', 'mamba2', 'jamba'"):
        hs.from_transformers(transformers.LlamaModel(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2)))
    with pytest.raises(TypeError, match="takes a transformers model or a directory"):
        hs.from_transformers(42)
    with pytest.raises(ValueError, match="not a directory saved with save_pretrained"):
        hs.from_transformers("/nonexistent/dir")
