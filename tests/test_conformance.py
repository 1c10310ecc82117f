"""DESIGN §4: the rules every registered model must pass, run over ``list_models()`` (and every
hybrid backbone), at each model's defaults and at one tiny fixed config."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hybridssm as hs
from conformance_cases import (
    CHUNK,
    LENGTHS,
    TINY,
    Case,
    all_cases,
    cached_model,
    fit_options,
    tiny_cases,
)
from helpers import assert_bitwise, assert_close, assert_tree_close, stream
from hybridssm.state import ModelState

CASES = all_cases()
TINY_CASES = tiny_cases()
ids = [c.id for c in CASES]
tiny_ids = [c.id for c in TINY_CASES]


def inputs(model, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, model.config.embed_dim, generator=g)


def seq_len_for(case: Case) -> int:
    return max(LENGTHS) if case.tiny else 7


# -- 1. streaming equals forward -------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=ids)
@torch.no_grad()
def test_stream_equals_forward(case: Case):
    model = cached_model(case)
    T = seq_len_for(case)
    x = inputs(model, 2, T)
    ys, _ = stream(model, x)
    ys_inplace, _ = stream(model, x, inplace=True)
    lengths = LENGTHS if case.tiny else [1, T]
    for t in lengths:
        full = model(x[:, :t], return_sequence=True)
        assert_close(ys[:, :t], full, msg=f"{case.id}: step vs forward at T={t}")
        assert_close(ys_inplace[:, :t], full, msg=f"{case.id}: inplace step vs forward at T={t}")
        assert_close(model(x[:, :t]), full[:, -1], msg=f"{case.id}: last timestep at T={t}")


@pytest.mark.parametrize("case", CASES, ids=ids)
@torch.no_grad()
def test_chain_of_prefill_steps_and_chunks(case: Case):
    model = cached_model(case)
    T = 2 * CHUNK + 3 if case.tiny else 9
    x = inputs(model, 2, T, seed=1)
    full = model(x, return_sequence=True)
    rng = random.Random(hash(case.id) & 0xFFFF)
    for _ in range(2):
        a, b, c = sorted(rng.sample(range(1, T), 3))
        y1, s = model(x[:, :a], return_state=True, return_sequence=True)
        y2, s = model(x[:, a:b], state=s, return_state=True, return_sequence=True)
        y3, s = stream(model, x[:, b:c], s)
        y4 = model(x[:, c:], state=s, return_sequence=True)
        got = torch.cat([y1, y2, y3, y4], 1)
        assert_close(got, full, msg=f"{case.id}: chain split at {a}, {b}, {c}")
    # the prefilled state equals the streamed state
    _, s_fwd = model(x, return_state=True)
    _, s_step = stream(model, x)
    assert_tree_close(s_fwd, s_step, msg=f"{case.id}: state after prefill vs after steps")


# -- 2. causality ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=ids)
@torch.no_grad()
def test_causality(case: Case):
    model = cached_model(case)
    T = seq_len_for(case)
    x = inputs(model, 2, T, seed=2)
    base = model(x, return_sequence=True)
    for s in sorted({1, T // 2, T - 1}):
        x2 = x.clone()
        x2[:, s:] = torch.randn_like(x2[:, s:]) * 3
        out = model(x2, return_sequence=True)
        assert_close(out[:, :s], base[:, :s], msg=f"{case.id}: output before {s} changed")


# -- 3. shapes and sizes -----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=ids)
@torch.no_grad()
def test_shapes_and_param_count(case: Case):
    model = cached_model(case)
    x = inputs(model, 3, 5)
    H = hs.output_size(case.name, **case.options())
    assert H == model.output_size == model.config.hidden_size
    assert model(x).shape == (3, H)
    assert model(x, return_sequence=True).shape == (3, 5, H)
    y, s = model.step(x[:, 0], model.init_state(3))
    assert y.shape == (3, H) and isinstance(s, ModelState) and s.pos.tolist() == [1, 1, 1]
    y3, _ = model.step(x[:, :1], model.init_state(3))  # [B, 1, E] is accepted too
    assert_close(y3, y)
    assert hs.param_count(case.name, **case.options()) == sum(p.numel() for p in model.parameters())


# -- 4. batch independence and padding --------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=ids)
@torch.no_grad()
def test_batch_independence(case: Case):
    model = cached_model(case)
    x = inputs(model, 3, 6, seed=3)
    full = model(x, return_sequence=True)
    for b in range(3):
        alone = model(x[b : b + 1], return_sequence=True)
        assert_close(full[b : b + 1], alone, msg=f"{case.id}: row {b} differs from running alone")


@pytest.mark.parametrize("case", CASES, ids=ids)
@torch.no_grad()
def test_lengths_padding_and_continuation(case: Case):
    model = cached_model(case)
    T = CHUNK + 1 if case.tiny else 6
    lengths = [T, 1, max(2, T // 2)]
    x = inputs(model, 3, T, seed=4)
    x_pad = x.clone()
    for b, n in enumerate(lengths):
        x_pad[b, n:] = 7.0  # garbage in the padding must not leak
    y_seq, s = model(x_pad, lengths=torch.tensor(lengths), return_sequence=True, return_state=True)
    y_last = model(x_pad, lengths=lengths)
    nxt = inputs(model, 3, 3, seed=5)
    cont, _ = stream(model, nxt, s)
    for b, n in enumerate(lengths):
        ref_seq, ref_state = model(x[b : b + 1, :n], return_sequence=True, return_state=True)
        assert_close(y_seq[b : b + 1, :n], ref_seq, msg=f"{case.id}: row {b} valid outputs")
        assert torch.all(y_seq[b, n:] == 0), f"{case.id}: padded outputs must be zeros"
        assert_close(y_last[b : b + 1], ref_seq[:, -1], msg=f"{case.id}: row {b} last output")
        assert_tree_close(s.index(b), ref_state, msg=f"{case.id}: row {b} state after lengths")
        ref_cont, _ = stream(model, nxt[b : b + 1], ref_state)
        assert_close(cont[b : b + 1], ref_cont, msg=f"{case.id}: row {b} continuation")
    # lengths combined with a state
    y2, s2 = model(x_pad, state=s, lengths=lengths, return_state=True)
    assert s2.pos.tolist() == [2 * n for n in lengths]


# -- 5. state handling -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=ids)
@torch.no_grad()
def test_step_is_functional_and_reset(case: Case):
    model = cached_model(case)
    x = inputs(model, 2, 4, seed=6)
    _, s = model(x[:, :3], return_state=True)
    before = s.clone()
    y, s_new = model.step(x[:, 3], s)
    assert_tree_close(s, before, msg=f"{case.id}: step modified the state passed in")
    for a, b in zip(torch.utils._pytree.tree_leaves(s), torch.utils._pytree.tree_leaves(before)):
        assert_bitwise(a, b, f"{case.id}: step modified the state passed in")
    # inplace writes into the buffers and gives the same values
    s_in = s.clone()
    y_in, s_in2 = model.step(x[:, 3], s_in, inplace=True)
    assert_close(y_in, y)
    assert_tree_close(s_in2, s_new)
    assert_tree_close(s_in, s_new, msg=f"{case.id}: inplace step did not write the buffers")
    # reset: row 1 restarts from a fresh state
    done = torch.tensor([False, True])
    y_r, s_r = model.step(x[:, 3], s, reset=done)
    fresh, _ = model.step(x[1:, 3], model.init_state(1))
    assert_close(y_r[:1], y[:1], msg=f"{case.id}: reset changed a row that was not reset")
    assert_close(y_r[1:], fresh, msg=f"{case.id}: a reset row differs from a fresh start")
    assert s_r.pos.tolist() == [4, 1]
    y_ri, _ = model.step(x[:, 3], s.clone(), reset=done, inplace=True)
    assert_close(y_ri, y_r)


@pytest.mark.parametrize("case", TINY_CASES, ids=tiny_ids)
@torch.no_grad()
def test_full_attention_capacity_error(case: Case):
    model = cached_model(case)
    state = model.init_state(1, max_len=3)
    if model.state_max_len(state) is None:
        pytest.skip("no full-attention cache in this model")
    x = inputs(model, 1, 5)
    for t in range(3):
        _, state = model.step(x[:, t], state)
    with pytest.raises(ValueError, match="max_len"):
        model.step(x[:, 3], state)
    with pytest.raises(ValueError, match="max_len"):
        model(x, return_state=True, max_len=4)
    # without a state there is no cache and no limit
    assert model(x).shape == (1, model.output_size)


# -- 6. gradients ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_gradients_and_checkpointing(case: Case):
    torch.manual_seed(0)
    x = inputs(cached_model(case), 2, 6, seed=7)
    m1 = case.build(dropout=0.0).train()
    m2 = case.build(dropout=0.0, checkpoint_every=1).train()
    m2.load_state_dict(m1.state_dict())
    for m in (m1, m2):
        m(x, return_sequence=True).pow(2).mean().backward()
    for (name, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert p1.grad is not None, f"{case.id}: {name} got no gradient"
        assert torch.isfinite(p1.grad).all(), f"{case.id}: {name} has a non-finite gradient"
        assert_close(p2.grad, p1.grad, msg=f"{case.id}: {name}: checkpointing changed the gradient")


@pytest.mark.parametrize("case", TINY_CASES, ids=tiny_ids)
def test_gradient_through_state(case: Case):
    """Truncated BPTT: the state returned by a chunk carries gradient into the next chunk."""
    model = case.build().eval()
    x = inputs(model, 2, 6, seed=8).requires_grad_()
    w = torch.randn(model.output_size)  # a plain sum of a LayerNorm output has no gradient
    _, s = model(x[:, :3], return_state=True)
    (model(x[:, 3:], state=s) * w).sum().backward()
    assert x.grad is not None and x.grad[:, :3].abs().sum() > 0
    x.grad = None
    _, s = model(x[:, :3], return_state=True)
    (model(x[:, 3:], state=s.detach()) * w).sum().backward()
    assert x.grad is None or x.grad[:, :3].abs().sum() == 0


# -- 7. round trip and compile -----------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=ids)
@torch.no_grad()
def test_save_load_bitwise(case: Case, tmp_path):
    model = cached_model(case)
    model.save_pretrained(tmp_path / "m")
    loaded = hs.load(tmp_path / "m").eval()
    assert type(loaded) is type(model) and loaded.config == model.config
    x = inputs(model, 2, 5)
    assert_bitwise(loaded(x, return_sequence=True), model(x, return_sequence=True))
    s = model.init_state(2)
    assert_bitwise(loaded.step(x[:, 0], s)[0], model.step(x[:, 0], s)[0])




def _option_variant(case: Case) -> bool:
    """A variant that sets options beyond the attention kind (full or sliding cache)."""
    return case.variant and {k for k, _ in case.opts} - set(TINY) != {"use_sliding_window"}


# Compiling takes 5-15 s a case: the option variants compile in `make test-all`; the default run
# compiles every model and backbone and both attention caches, and holds the option variants to
# every other rule.
COMPILE_CASES = [pytest.param(c, marks=pytest.mark.slow) if _option_variant(c) else c for c in TINY_CASES]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=tiny_ids)
@torch.no_grad()
def test_compile_forward_and_step(case: Case):
    torch._dynamo.reset()
    model = cached_model(case)
    x = inputs(model, 2, 5)
    fwd = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(fwd(x, return_sequence=True), model(x, return_sequence=True))
    step = torch.compile(model.step, fullgraph=True, backend="aot_eager")
    s = model.init_state(2)
    s_c = s.clone()
    for t in range(3):
        y, s = model.step(x[:, t], s)
        # compiled once: the state a step returns has init_state's layout (a stride change would
        # stall a real-time loop on a recompile at its second frame)
        with torch.compiler.set_stance("fail_on_recompile" if t else "default"):
            y_c, s_c = step(x[:, t], s_c)
        assert_close(y_c, y, msg=f"{case.id}: compiled step at t={t}")
    assert_tree_close(s_c, s)


# -- 8. bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", TINY_CASES, ids=tiny_ids)
def test_bad_input(case: Case):
    model = cached_model(case)
    E = model.config.embed_dim
    x = inputs(model, 2, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model(x.tolist())
    with pytest.raises(ValueError, match=r"x: expected a 3-D tensor"):
        model(x[0])
    with pytest.raises(ValueError, match=rf"embed_dim={E}"):
        model(torch.randn(2, 4, E + 1))
    with pytest.raises(ValueError, match="dtype"):
        model(x.double())
    with pytest.raises(ValueError, match="floating-point"):
        model(x.long())
    with pytest.raises(ValueError, match="empty sequence"):
        model(x[:, :0])
    with pytest.raises(ValueError, match="device"):
        model(x.to("meta"))
    with pytest.raises(ValueError, match=r"lengths: values must be in 1\.\.4"):
        model(x, lengths=[0, 4])
    with pytest.raises(ValueError, match=r"lengths: values must be in 1\.\.4"):
        model(x, lengths=torch.tensor([5, 4]))
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\)"):
        model(x, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="integer"):
        model(x, lengths=torch.tensor([1.0, 2.0]))
    s3 = model.init_state(3)
    with pytest.raises(ValueError, match="batch size|shape"):
        model(x, state=s3)
    with pytest.raises(ValueError, match="state"):
        model.step(x[:, 0], (1, 2))
    other = hs.build("gated_ssm", embed_dim=E, hidden_size=16, num_layers=3)
    with pytest.raises(ValueError, match="another model|layer states"):
        model.step(x[:, 0], other.init_state(2))
    with pytest.raises(ValueError, match="step takes one frame"):
        model.step(x, model.init_state(2))
    with pytest.raises(ValueError, match=r"reset: expected a bool tensor of shape \(2,\)"):
        model.step(x[:, 0], model.init_state(2), reset=torch.tensor([1, 0]))


@pytest.mark.parametrize("name", hs.list_models())
def test_bad_options(name: str):
    cfg = hs.get_config_class(name)
    with pytest.raises(TypeError, match="did you mean 'hidden_size'"):
        hs.build(name, embed_dim=4, hiden_size=8)
    with pytest.raises(TypeError, match="embed_dim"):
        hs.build(name)
    for opt in ("hidden_size", "num_layers"):
        with pytest.raises(ValueError, match=rf"'{opt}'.*-3"):
            hs.build(name, embed_dim=4, **{opt: -3})
    with pytest.raises(ValueError, match=r"'dropout'.*1\.5"):
        hs.build(name, embed_dim=4, dropout=1.5)
    with pytest.raises(ValueError, match="unknown model"):
        hs.build(name + "x", embed_dim=4)
    assert hs.param_count(name, **cfg.recommended, embed_dim=4) > 0
    assert isinstance(hs.recommended_defaults(name), dict)


# -- hypothesis: random small configs for rules 1-4 ----------------------------------------------------
@st.composite
def small_configs(draw):
    name = draw(st.sampled_from(hs.list_models()))
    heads = draw(st.sampled_from([1, 2]))
    opts = dict(
        embed_dim=draw(st.integers(1, 9)),
        hidden_size=draw(st.sampled_from([8, 16, 24])),
        num_layers=draw(st.integers(1, 3)),
        state_size=draw(st.integers(1, 6)),
        expand_factor=draw(st.integers(1, 2)),
        conv_size=draw(st.integers(1, 4)),
        num_heads=heads,
        head_dim=draw(st.sampled_from([4, 8])),
        window_size=draw(st.integers(1, 6)),
        chunk_size=draw(st.integers(1, 8)),
        scan_chunk_size=draw(st.integers(1, 8)),
        attention_every=draw(st.integers(1, 3)),
        num_meta_tokens=draw(st.integers(1, 3)),
        dropout=0.0,
    )
    if name == "hybrid":
        from hybridssm.backbones import list_backbones

        opts["backbone"] = draw(st.sampled_from(list_backbones()))
    opts = fit_options(name, opts)
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    return name, opts, B, T, lengths


@given(small_configs())
@torch.no_grad()
def test_random_configs_stream_causal_padding(cfg):
    name, opts, B, T, lengths = cfg
    torch.manual_seed(0)
    model = hs.build(name, **opts).eval()
    x = torch.randn(B, T, model.config.embed_dim)
    full = model(x, return_sequence=True)
    assert full.shape == (B, T, model.output_size)
    ys, s_step = stream(model, x)
    assert_close(ys, full, msg=f"{name} {opts}: stream vs forward")
    if T > 1:
        x2 = x.clone()
        x2[:, T // 2 :] += 1.0
        assert_close(model(x2, return_sequence=True)[:, : T // 2], full[:, : T // 2])
    y_pad, s_pad = model(x, lengths=lengths, return_sequence=True, return_state=True)
    for b, n in enumerate(lengths):
        ref, ref_state = model(x[b : b + 1, :n], return_sequence=True, return_state=True)
        assert_close(y_pad[b : b + 1, :n], ref, msg=f"{name} {opts}: row {b} with lengths")
        assert_tree_close(s_pad.index(b), ref_state, msg=f"{name} {opts}: row {b} state")
    assert hs.param_count(name, **opts) == sum(p.numel() for p in model.parameters())


# -- dtypes: bf16 autocast tracks fp32, and recurrent states stay fp32 ---------------------------------
@pytest.mark.parametrize("case", TINY_CASES, ids=tiny_ids)
@torch.no_grad()
def test_bf16_autocast_tracks_fp32(case: Case):
    model = cached_model(case)
    x = inputs(model, 2, 9, seed=9)
    ref, ref_state = model(x, return_sequence=True, return_state=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = model(x, return_sequence=True, return_state=True)
        y_step, _ = model.step(x[:, 0], model.init_state(2))
    assert torch.isfinite(y).all()
    assert_close(y.float(), ref, "bf16", msg=f"{case.id}: bf16 autocast vs fp32")
    assert_close(y_step.float(), ref[:, 0], "bf16", msg=f"{case.id}: bf16 step vs fp32")
    for leaf, ref_leaf in zip(torch.utils._pytree.tree_leaves(state),
                              torch.utils._pytree.tree_leaves(ref_state)):
        assert leaf.dtype == ref_leaf.dtype, f"{case.id}: autocast changed a state dtype"
