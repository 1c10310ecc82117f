"""The glue of the one-call step at many streams: a reset writes every restarted row of every state
tensor in one call (with the values of the per-tensor writes it replaces), a small batch reads each
weight once and still gives every row the values of that row alone, and Hymba's meta-token prefill
runs the row-wise parts of a block over all its tokens at once with the values of one token at a
time."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import hybridssm as hs
from helpers import assert_tree_close, block_by_block
from hybridssm import streaming
from hybridssm.models.base import SequenceModel

# hidden 20: rows of 20 floats end in a partial SIMD vector, and 20 output rows leave a remainder
# for every number of weight rows gemv_rows_multi takes per pass. Hymba at 32: torch's element-wise
# kernels (its fusion gate's sigmoid) compute the last elements of a tensor whose size is not a
# multiple of two SIMD vectors with the scalar formula, so at other widths a row's values there
# depend on the batch (in every version of the step); its Mamba path keeps a partial vector (dt
# rank 2) and 32 output rows a remainder for 3 weight rows per pass.
MODELS = {
    "mamba": dict(hidden_size=20),
    "hymba": dict(hidden_size=32, num_heads=2, num_meta_tokens=3, window_size=4),
    "transformer": dict(hidden_size=20, num_heads=2),
    "hybrid": dict(hidden_size=20, num_heads=2, head_dim=10, attention_every=2),
}


def _model(name, dtype=torch.float32):
    torch.manual_seed(0)
    return hs.build(name, embed_dim=6, num_layers=2, **MODELS[name]).to(dtype).eval()


def _leaves(state):
    return pytree.tree_leaves(state)


def _assert_states_equal(a, b, msg=""):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        assert torch.equal(x, y), msg


class _FillCalls(list):
    """What each ``streaming.fill_rows`` call answered; ``decline = True`` makes it answer False
    (nothing written) so that the model writes each tensor itself."""

    decline = False


@pytest.fixture
def fill_calls(monkeypatch):
    calls = _FillCalls()
    real = streaming.fill_rows

    def counted(*args):
        out = False if calls.decline else real(*args)
        calls.append(out)
        return out

    monkeypatch.setattr(streaming, "fill_rows", counted)
    return calls


@pytest.mark.parametrize("name", sorted(MODELS))
def test_reset_in_one_call_equals_the_per_tensor_writes(name, fill_calls):
    model = _model(name)
    x = torch.randn(5, 4, 6)
    done = torch.tensor([True, False, False, True, False])
    with torch.no_grad():
        state = model.init_state(5)
        for t in range(3):
            model.step(x[:, t], state, inplace=True)
        before = state.clone()
        fill_calls.decline = True  # each tensor written from Python (index_copy_)
        want = model.reset_rows(state.clone(), done, inplace=True)
        fill_calls.decline = False
        got = model.reset_rows(state, done, inplace=True)
        assert got is state and fill_calls == [False, True]
        _assert_states_equal(got, want, name)
        fresh = model.init_state(1)
        for row in range(5):
            row_state = got.index(row)
            _assert_states_equal(row_state, fresh if done[row] else before.index(row), f"{name} row {row}")
        # no row restarts: nothing is built or written
        fill_calls.clear()
        assert model.reset_rows(state, torch.zeros(5, dtype=torch.bool), inplace=True) is state
        assert fill_calls == []


def test_fill_rows_declines_what_it_cannot_copy_and_writes_nothing():
    model = _model("mamba")
    done = torch.tensor([True, False])
    with torch.no_grad():
        state = model.init_state(2)
        for _ in range(2):
            model.step(torch.randn(2, 6), state, inplace=True)
        one = model.init_state(1)
        conv, ssm = state.layers[0]
        strided = type(state.layers[0])(conv.transpose(1, 2).contiguous().transpose(1, 2), ssm)
        cases = {
            "non-contiguous": state._replace(layers=(strided, *state.layers[1:])),
            "other dtype": one._replace(pos=one.pos.double()),
        }
        for what, case in cases.items():
            dst, src = (case, one) if what == "non-contiguous" else (state, case)
            before = dst.clone()
            assert streaming.fill_rows(dst, src, done) is False, what
            _assert_states_equal(dst, before, what)
        # the model's reset still restarts those rows (one Python write per tensor)
        bad = cases["non-contiguous"]
        out = model.reset_rows(bad, done, inplace=True)
        _assert_states_equal(out.index(0), one)


def test_reset_of_a_state_that_needs_its_gradient_stays_with_autograd(fill_calls):
    model = _model("mamba")
    _, state = model.step(torch.randn(2, 6), model.init_state(2))  # grad mode: part of the graph
    grads = [t for t in pytree.tree_leaves(state) if t.requires_grad]
    assert grads
    versions = [t._version for t in grads]
    out = model.reset_rows(state, torch.tensor([True, False]), inplace=True)
    # declined (a C++ copy would be invisible to autograd): written by index_copy_, which bumps
    # every tensor's version, so a backward through a stale saved value fails loudly
    assert fill_calls == [False]
    assert all(t._version > v for t, v in zip(grads, versions))
    with torch.no_grad():
        _assert_states_equal(out.index(0), model.init_state(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_small_batch_gives_each_row_its_own_values_exactly(name, dtype):
    # up to 4 rows share each weight read (gemv_rows_multi), with the accumulation of one row alone
    model = _model(name, dtype)
    with torch.no_grad():
        for B in (2, 3, 4):
            x = torch.randn(B, 3, 6, dtype=dtype)
            state = model.init_state(B)
            alone = [model.init_state(1) for _ in range(B)]
            for t in range(3):
                y, state = model.step(x[:, t], state, inplace=True)
                ys = [model.step(x[b : b + 1, t], alone[b], inplace=True)[0] for b in range(B)]
                assert torch.equal(y, torch.cat(ys)), f"{name} B={B} t={t}"
            for b in range(B):
                _assert_states_equal(state.index(b), alone[b], f"{name} B={B} row {b} state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meta_prefill_over_all_tokens_equals_one_token_at_a_time(dtype):
    model = _model("hymba", dtype)
    meta = model.meta_embedding.unsqueeze(0)
    with torch.no_grad():
        together, one_by_one = (SequenceModel.init_state(model, 1) for _ in range(2))
        assert streaming.prefill_blocks(model, meta, together)
        for t in range(meta.shape[1]):
            assert streaming.prefill_blocks(model, meta[:, t : t + 1], one_by_one)
        _assert_states_equal(together, one_by_one)
        # and both are the blocks' forward over the meta tokens (the state init_state stands for)
        with block_by_block(model):
            want = model.init_state(1)
        got = model.init_state(1)
    assert_tree_close(got, want, "fp32" if dtype == torch.float32 else "fp64")


def test_meta_prefill_of_many_rows_leaves_its_input_alone():
    # more than 4 rows: the row-wise parts run as one GEMM over every token of every row
    model = _model("hymba")
    meta = model.meta_embedding.unsqueeze(0).expand(3, -1, -1).contiguous()
    with torch.no_grad():
        before = meta.clone()
        state = SequenceModel.init_state(model, 3)
        assert streaming.prefill_blocks(model, meta, state)
        assert torch.equal(meta, before)
        want = model.init_state(3)
    assert_tree_close(state, want)
