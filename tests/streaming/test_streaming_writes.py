"""Nothing goes stale, nothing half-happens: Hymba's ``init_state`` follows every write to its
parameters, a step refused at ``max_len`` leaves every layer as it was, and models built or loaded
inside ``torch.inference_mode()`` stream (with flat memory)."""

from __future__ import annotations

import pytest
import torch

import hybridssm as hs
from helpers import assert_close, assert_tree_close


def _hymba(**kw):
    torch.manual_seed(0)
    return hs.build("hymba", embed_dim=6, hidden_size=16, num_layers=2, num_heads=2, num_meta_tokens=2,
                    state_size=4, **kw).eval()


def _stream(model, x):
    """Step ``x [B, T, E]`` through the model in place from ``init_state``: ``[B, T, hidden]``."""
    state, ys = model.init_state(x.shape[0]), []
    for t in range(x.shape[1]):
        y, state = model.step(x[:, t], state, inplace=True)
        ys.append(y)
    return torch.stack(ys, 1)


def _writes():
    def data_copy(m):
        m.meta_embedding.data.copy_(torch.randn_like(m.meta_embedding))

    def data_assign(m):
        m.meta_embedding.data = torch.randn_like(m.meta_embedding)

    def block_weight_through_data(m):
        m.blocks[0].ssm.in_proj.weight.data.mul_(1.5)

    def load_state_dict(m):
        sd = {k: v + 0.1 * torch.randn_like(v) for k, v in m.state_dict().items()}
        m.load_state_dict(sd)

    def optimizer_step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()

    return [data_copy, data_assign, block_weight_through_data, load_state_dict, optimizer_step]


@pytest.mark.parametrize("write", _writes(), ids=lambda f: f.__name__)
def test_hymba_init_state_follows_every_write(write):
    model = _hymba()
    x = torch.randn(2, 5, 6)
    with torch.no_grad():
        model.init_state(2)  # what an earlier version cached
        write(model)
        want = model(x, return_sequence=True)
        got = _stream(model, x)
    assert_close(got, want)


def test_hymba_reset_uses_the_current_parameters():
    model = _hymba()
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        state = model.init_state(2)
        model.step(x[:, 0], state, inplace=True)
        model.meta_embedding.data.copy_(torch.randn_like(model.meta_embedding))
        y, _ = model.step(x[:, 1], state, reset=torch.tensor([True, False]), inplace=True)
        assert_close(y[:1], model(x[:1, 1:2]))


def test_hymba_init_state_in_another_dtype_is_a_clear_error_and_float64_models_work():
    # a state's dtype follows the parameters (forward and step refuse any other), so asking for
    # another one names the option instead of failing deep inside torch; a float64 model's
    # init_state (its meta-token prefill) runs in float64
    model = _hymba()
    with pytest.raises(ValueError, match=r"dtype: .*torch\.float32.*model\.to\(torch\.float64\)"):
        model.init_state(2, dtype=torch.float64)
    model = model.double()
    state = model.init_state(2, dtype=torch.float64)
    for t in (t for layer in state.layers for part in layer for t in part):
        assert t.dtype in (torch.float64, torch.long)
    with torch.no_grad():
        want = model.init_state(2)
    assert_tree_close(state, want)


# -- a step refused at max_len writes nothing ------------------------------------------------------
CAPACITY_MODELS = {
    "hybrid": dict(use_sliding_window=False, attention_every=2, num_heads=2, head_dim=8),
    "hymba": dict(num_heads=2, num_meta_tokens=2),
    "ss_transformer": dict(num_heads=2, head_dim=8),
}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("name", sorted(CAPACITY_MODELS))
def test_step_refused_at_max_len_leaves_every_layer_unchanged(name, fused):
    torch.manual_seed(0)
    model = hs.build(name, embed_dim=6, hidden_size=16, num_layers=2, state_size=4,
                     **CAPACITY_MODELS[name]).eval()
    model.use_fused_step = fused
    x = torch.randn(1, 4, 6)
    with torch.no_grad():
        state = model.init_state(1, max_len=3)
        for t in range(3):
            model.step(x[:, t], state, inplace=True)
        before = state.clone()
        with pytest.raises(ValueError, match="max_len=3"):
            model.step(x[:, 3], state, inplace=True)
        assert_tree_close(state, before)
        # a row being reset starts again from position 0: that step fits
        model.step(x[:, 3], state, reset=torch.tensor([True]), inplace=True)
        assert state.pos.tolist() == [1]


# -- inference mode ---------------------------------------------------------------------------------
INFERENCE_MODELS = ["mamba", "mamba2", "gated_ssm", "hybrid", "hymba", "ss_transformer", "transformer"]


@pytest.mark.parametrize("name", INFERENCE_MODELS)
def test_model_built_and_streamed_in_inference_mode(name):
    x = torch.randn(2, 5, 6)
    with torch.inference_mode():
        torch.manual_seed(0)
        model = hs.build(name, embed_dim=6, hidden_size=16, num_layers=2).eval()
        want = model(x, return_sequence=True)
        got = _stream(model, x)
    assert_close(got, want)


def test_model_loaded_in_inference_mode_streams(tmp_path):
    torch.manual_seed(0)
    hs.build("mamba", embed_dim=6, hidden_size=16, num_layers=2).save_pretrained(tmp_path)
    x = torch.randn(1, 4, 6)
    with torch.inference_mode():
        model = hs.load(tmp_path).eval()
        want = model(x, return_sequence=True)
        got = _stream(model, x)
    assert_close(got, want)


@pytest.mark.slow
def test_100k_inplace_steps_keep_memory_flat():
    import resource

    model = hs.build("mamba", embed_dim=6, hidden_size=16, num_layers=2).eval()
    x = torch.randn(1, 6)
    with torch.inference_mode():
        state = model.init_state(1)
        for _ in range(1000):
            model.step(x, state, inplace=True)
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(100_000):
            model.step(x, state, inplace=True)
        grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    assert state.pos.tolist() == [101_000]
    assert grown_kb < 20_000, f"peak memory grew by {grown_kb} kB over 100k steps"
