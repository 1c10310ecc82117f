"""Hymba's resets inside the many-streams step: from 5 streams, the rows that restart take the state
after the meta tokens within the same C++ call (the meta rows ride along with the step's rows
through every block's products; ``csrc/step/plan.h`` run with tokens, ``prefill.h``'s restart
entries), instead of a separate prefill and row copy before the step. The restarted rows equal a
fresh ``init_state`` row and the block-by-block step within float rounding; every other row keeps
the values of the same step without a reset, bit for bit; the meta tokens follow the current
parameters; a refused step writes nothing."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import hybridssm as hs
from helpers import assert_close, assert_tree_close, block_by_block
from hybridssm import streaming
from hybridssm.models import hymba as hymba_module
from hybridssm.models.base import SequenceModel

E_IN = 6
# hidden 32: torch's element-wise kernels (the fusion gate's sigmoid, the FFN's GELU) take a
# tensor's elements in chunks of 16 floats; at a width that is a multiple of it, appending the meta
# rows leaves every step row's elements in the same kind of chunk (see test_step_many_streams.py)
HYMBA = dict(embed_dim=E_IN, hidden_size=32, num_layers=2, num_heads=2, num_meta_tokens=3, window_size=4,
             state_size=4, global_layers=(1,))


def _hymba(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return hs.build("hymba", **{**HYMBA, **kw}).to(dtype).eval()


def _leaves(state):
    return pytree.tree_leaves(state)


def _streamed(model, B, T=3, dtype=torch.float32):
    """A state of B streams after T frames, and the frames (T + 2 of them)."""
    x = torch.randn(B, T + 2, E_IN, dtype=dtype)
    state = model.init_state(B)
    for t in range(T):
        model.step(x[:, t], state, inplace=True)
    return state, x


@pytest.fixture
def reset_calls(monkeypatch):
    """Every call of ``SequenceModel.reset_rows`` (the reset before the step)."""
    calls = []
    real = SequenceModel.reset_rows

    def counted(self, *args, **kw):
        calls.append(args[1])
        return real(self, *args, **kw)

    monkeypatch.setattr(SequenceModel, "reset_rows", counted)
    return calls


@pytest.mark.parametrize("B", [7, 256])  # 256: the step's own products' widest batch, plus the meta rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_restarted_rows_equal_a_fresh_row_and_the_other_rows_keep_their_values(dtype, B, reset_calls):
    model = _hymba(dtype)
    cls = "fp32" if dtype == torch.float32 else "fp64"
    with torch.no_grad():
        state, x = _streamed(model, B, dtype=dtype)
        done = torch.zeros(B, dtype=torch.bool)
        done[[1, 4, B - 1]] = True
        plain = state.clone()
        y_plain, _ = model.step(x[:, 3], plain, inplace=True)
        ref = state.clone()
        with block_by_block(model):
            y_ref, _ = model.step(x[:, 3], ref, reset=done, inplace=True)
        reset_calls.clear()
        y, out = model.step(x[:, 3], state, reset=done, inplace=True)
        assert out is state and reset_calls == [], "the reset ran before the step, not inside it"
        assert state.pos.tolist() == torch.where(done, 1, 4).tolist()
        # every other row: the values of the step without a reset, bit for bit
        keep = ~done
        assert torch.equal(y[keep], y_plain[keep])
        for got, want in zip(_leaves(state), _leaves(plain), strict=True):
            assert torch.equal(got[keep], want[keep])
        # the restarted rows: a fresh init_state row's step, and the block-by-block step
        fresh = model.init_state(3)
        y_fresh, _ = model.step(x[done, 3], fresh, inplace=True)
        assert_close(y[done], y_fresh, cls)
        assert_close(y, y_ref, cls)
        assert_tree_close(state, ref, cls)
        for row, fresh_row in zip(done.nonzero().squeeze(1).tolist(), range(3)):
            assert_tree_close(state.index(row), fresh.index(fresh_row), cls, f"row {row}")
        # and they stream on as a fresh stream does
        y_next, _ = model.step(x[:, 4], state, inplace=True)
        assert_close(y_next[done], model.step(x[done, 4], fresh, inplace=True)[0], cls)


def test_small_batches_and_batch_one_reset_before_the_step(reset_calls):
    # up to 4 streams the step's products are per-row GEMVs that the meta rows cannot share
    # (and batch 1 stays as it was): the reset's own prefill and row copy run first
    model = _hymba()
    with torch.no_grad():
        for B in (1, 4, 5):
            state, x = _streamed(model, B)
            reset_calls.clear()
            model.step(x[:, 3], state, reset=torch.ones(B, dtype=torch.bool), inplace=True)
            assert len(reset_calls) == (B < hymba_module.RESTART_IN_STEP_MIN_BATCH), f"B={B}"
            assert state.pos.tolist() == [1] * B


def test_restart_where_the_products_run_apart_equals_init_state_exactly():
    # at 2 streams the step's rows and the meta rows go through separate products (linear_joint's
    # split): the restarted rows' state is then init_state's bit for bit, the others' the plain step's
    model = _hymba()
    with torch.no_grad():
        state, x = _streamed(model, 2)
        plain = state.clone()
        y_plain, _ = model.step(x[:, 3], plain, inplace=True)
        done = torch.tensor([True, False])
        meta = model.meta_embedding.detach()
        y, _ = streaming.fused_step(model, x[:, 3], state, True, restart=(meta, done))
        assert torch.equal(y[1], y_plain[1])
        fresh = model.init_state(1)
        y_fresh, _ = model.step(x[:1, 3], fresh, inplace=True)
        assert torch.equal(y[:1], y_fresh)
        for got, want, other in zip(_leaves(state), _leaves(fresh), _leaves(plain), strict=True):
            assert torch.equal(got[:1], want) and torch.equal(got[1:], other[1:])


def test_restart_follows_parameter_writes():
    # nothing derived from a weight is kept: the meta rows run from the parameters as they are now
    model = _hymba()
    B = 6
    done = torch.tensor([True, False, False, False, False, True])
    with torch.no_grad():
        state, x = _streamed(model, B)
        model.meta_embedding.data.copy_(torch.randn_like(model.meta_embedding))
        up = next(p for n, p in model.blocks[0].named_parameters() if n.endswith("up.weight"))
        up.data.mul_(1.5)
        y, _ = model.step(x[:, 3], state, reset=done, inplace=True)
        assert_close(y[done], model(x[done, 3:4]))


def test_a_refused_step_with_restarting_rows_writes_nothing():
    model = _hymba(global_layers=None)  # every layer full attention
    B = 6
    with torch.no_grad():
        state = model.init_state(B, max_len=3)
        x = torch.randn(B, 4, E_IN)
        for t in range(3):
            model.step(x[:, t], state, inplace=True)
        before = state.clone()
        done = torch.tensor([True, True, False, True, True, True])  # row 2 is past max_len
        with pytest.raises(ValueError, match="max_len=3"):
            model.step(x[:, 3], state, reset=done, inplace=True)
        for got, want in zip(_leaves(state), _leaves(before), strict=True):
            assert torch.equal(got, want)


def test_plan_restart_checks_its_arguments_and_plans_without_restart_entries_decline():
    model = _hymba()
    with torch.no_grad():
        state, x = _streamed(model, 6)
        meta = model.meta_embedding.detach()
        before = state.clone()
        with pytest.raises(RuntimeError, match=r"done must be a contiguous CPU bool tensor \[6\]"):
            streaming.fused_step(model, x[:, 3], state, True, restart=(meta, torch.ones(6, dtype=torch.long)))
        with pytest.raises(RuntimeError, match=r"tokens .* do not fit"):
            streaming.fused_step(model, x[:, 3], state, True,
                                 restart=(meta[:, :8].contiguous(), torch.ones(6, dtype=torch.bool)))
        for got, want in zip(_leaves(state), _leaves(before), strict=True):
            assert torch.equal(got, want)
        # functional steps do not restart inside the call
        everyone = torch.ones(6, dtype=torch.bool)
        assert streaming.fused_step(model, x[:, 3], state, False, restart=(meta, everyone)) is None
    # a plan with a mixer that has no restart entry declines (its model resets before the step)
    gated = hs.build("gated_ssm", embed_dim=E_IN, hidden_size=32, num_layers=1).eval()
    with torch.no_grad():
        s = gated.init_state(6)
        assert not streaming.plan._entry(gated).plan.restarts
        assert streaming.fused_step(gated, torch.randn(6, E_IN), s, True,
                                    restart=(torch.zeros(2, 32), torch.ones(6, dtype=torch.bool))) is None


def test_a_plan_that_embeds_positions_restarts_rows_at_position_zero():
    # a transformer with sinusoidal positions: its plan applies the embedding before the call, at
    # each row's position, and a restarting row is embedded at position 0
    model = hs.build("transformer", embed_dim=E_IN, hidden_size=32, num_layers=1, num_heads=2,
                     positional="seed_sinusoidal", use_sliding_window=True, window_size=4).eval()
    plan = streaming.plan._entry(model).plan
    assert plan.embeds and plan.restarts
    tokens = torch.randn(1, 32)  # enters at the first block before a restarted row's frame
    with torch.no_grad():
        state, x = _streamed(model, 6)
        plain = state.clone()
        y_plain, _ = streaming.fused_step(model, x[:, 3], plain, True)
        nobody = torch.zeros(6, dtype=torch.bool)
        y, _ = streaming.fused_step(model, x[:, 3], state, True, restart=(tokens, nobody))
        assert torch.equal(y, y_plain)
        for got, want in zip(_leaves(state), _leaves(plain), strict=True):
            assert torch.equal(got, want)
        # row 2 restarts: the token through the blocks from a zero state, then its frame at position 0
        done = torch.tensor([False, False, True, False, False, False])
        fresh = model.init_state(1)
        assert streaming.prefill_blocks(model, tokens[None], fresh)
        y_fresh, fresh = model.step(x[2:3, 4], fresh, inplace=True)
        y, _ = streaming.fused_step(model, x[:, 4], state, True, restart=(tokens, done))
        assert_close(y[2:3], y_fresh)
        assert state.pos.tolist() == [5, 5, 1, 5, 5, 5]
