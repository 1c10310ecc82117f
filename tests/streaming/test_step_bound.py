"""The step's bound fast path (``hybridssm.streaming.plan.Bound``, ``csrc/step/bound.h``): a stream's
in-place steps of one state after the first take one call, and that call keeps every guarantee of the
path it shortcuts. Each test binds a state first, then changes what the fast path could miss, and
checks that the next step sees it (values, errors, fallbacks) and whether the bound call ran."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import hybridssm as hs
from helpers import assert_close, assert_tree_close, block_by_block
from hybridssm.ops import use_kernels
from hybridssm.ops._kernels import FORCED_BLOCKS
from hybridssm.streaming import plan as plan_mod
from hybridssm.streaming.plan import BOUND_KEY

E = 6

# a full-attention layer (a capacity to check) between two Mamba layers
HYBRID = dict(embed_dim=E, hidden_size=16, num_layers=3, num_heads=2, head_dim=8, state_size=4,
              attention_every=2, use_sliding_window=False, dropout=0.0)


def _model(**kw):
    torch.manual_seed(0)
    return hs.build("hybrid", **{**HYBRID, **kw}).eval()


class _Counted:
    """Wraps a bound step's ``run``: counts the calls that ran the step (not None)."""

    def __init__(self, run):
        self.inner, self.ran, self.calls = run, 0, 0

    def __call__(self, x):
        self.calls += 1
        y = self.inner(x)
        self.ran += y is not None
        return y


def _bind(model, B=2, steps=2, max_len=None):
    """A state stepped ``steps`` frames in place (bound at the second), and its counted bound run."""
    state = model.init_state(B, max_len=max_len)
    with torch.no_grad():
        for _ in range(steps):
            model.step(torch.randn(B, E), state, inplace=True)
    bound = model.__dict__.get(BOUND_KEY)
    assert bound is not None and bound.state is state, "an in-place fused step binds its state"
    bound.run = counted = _Counted(bound.run)
    return state, counted


def _reference_step(model, x, state):
    """The block-by-block step of a copy of the model from a copy of ``state``: ``(y, new state)``."""
    twin = copy.deepcopy(model)
    with torch.no_grad(), block_by_block(twin):
        return twin.step(x, state.clone(), inplace=True)


def test_a_stream_takes_the_bound_call_and_equals_the_forward():
    model = _model()
    x = torch.randn(2, 8, E)
    with torch.no_grad():
        want = model(x, return_sequence=True)
        state = model.init_state(2)
        ys = [model.step(x[:, t], state, inplace=True)[0] for t in range(2)]
        model.__dict__[BOUND_KEY].run = counted = _Counted(model.__dict__[BOUND_KEY].run)
        for t in range(2, 8):
            y, out = model.step(x[:, t], state, inplace=True)
            assert out is state
            ys.append(y)
    assert counted.ran == 6
    assert_close(torch.stack(ys, 1), want)


def test_states_stepped_in_turn_are_not_bound():
    # one model serving several states of batch 1: binding at every step would cost more than it saves
    model = _model()
    states = [model.init_state(1) for _ in range(3)]
    with torch.no_grad():
        for _ in range(3):
            for state in states:
                model.step(torch.randn(1, E), state, inplace=True)
        assert model.__dict__.get(BOUND_KEY) is None
        model.step(torch.randn(1, E), states[-1], inplace=True)  # the last state again: bound
    assert model.__dict__[BOUND_KEY].state is states[-1]


# -- parameters written between two steps of a bound state -----------------------------------------
def _writes():
    def data_assign(m):
        for p in m.parameters():
            p.data = p.data + 0.05 * torch.randn_like(p)

    def data_copy(m):
        for p in m.parameters():
            p.data.copy_(p.data * 1.1)

    def load_state_dict(m):
        m.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in m.state_dict().items()})

    def load_state_dict_assign(m):
        m.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in m.state_dict().items()}, assign=True)

    def optimizer_step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for p in m.parameters():
            p.grad = 0.05 * torch.randn_like(p)
        opt.step()

    def replace_parameter(m):
        blk = m.blocks[0]
        blk.mixer.out_proj.weight = nn.Parameter(blk.mixer.out_proj.weight.detach() * 1.5)

    def to_float64_and_back(m):
        m.to(torch.float64)
        with torch.no_grad():
            m.final_norm.weight.mul_(1.5)
        m.to(torch.float32)

    return [data_assign, data_copy, load_state_dict, load_state_dict_assign, optimizer_step,
            replace_parameter, to_float64_and_back]


@pytest.mark.parametrize("write", _writes(), ids=lambda f: f.__name__)
def test_a_parameter_written_between_two_steps_is_seen(write):
    model = _model()
    state, _ = _bind(model)
    write(model)
    model.eval()
    x = torch.randn(2, E)
    want, want_state = _reference_step(model, x, state)
    with torch.no_grad():
        y, _ = model.step(x, state, inplace=True)
    assert_close(y, want)
    assert_tree_close(state, want_state)
    # the next steps run bound again (the state is rebound where the plan was rebuilt)
    with torch.no_grad():
        model.step(x, state, inplace=True)
    assert model.__dict__[BOUND_KEY].state is state


def test_the_models_dtype_changed_through_data_refuses_the_old_frames():
    model = _model()
    state, counted = _bind(model)
    for p in model.parameters():
        p.data = p.data.double()
    with torch.no_grad(), pytest.raises(ValueError, match="dtype"):
        model.step(torch.randn(2, E), state, inplace=True)
    assert counted.ran == 0


# -- what selects the path: backend, use_fused_step, train mode, gradients, autocast, compile --------
def test_use_kernels_between_steps_is_seen(monkeypatch):
    model = _model()
    state, counted = _bind(model)
    plan_runs = []
    real = plan_mod.StepPlan.run
    monkeypatch.setattr(plan_mod.StepPlan, "run",
                        lambda self, *a, **k: plan_runs.append(1) or real(self, *a, **k))
    x = torch.randn(2, E)
    want, _ = _reference_step(model, x, state)
    with torch.no_grad(), use_kernels("torch"):
        assert FORCED_BLOCKS[0] == 1
        y, _ = model.step(x, state, inplace=True)
    assert FORCED_BLOCKS[0] == 0
    assert counted.calls == 0 and plan_runs == [], "the torch backend ran the fused step"
    assert_close(y, want)
    with torch.no_grad():
        model.step(x, state, inplace=True)
    assert counted.ran == 1


def test_a_use_kernels_block_that_raises_closes_its_count():
    with pytest.raises(RuntimeError), use_kernels("torch"):
        raise RuntimeError("inside")
    assert FORCED_BLOCKS[0] == 0


def test_use_fused_step_off_between_steps_is_seen():
    model = _model()
    state, counted = _bind(model)
    model.use_fused_step = False
    with torch.no_grad():
        model.step(torch.randn(2, E), state, inplace=True)
    assert counted.calls == 0


def test_train_mode_between_steps_is_seen():
    model = _model(dropout=0.5)
    state, counted = _bind(model)
    x = torch.randn(2, E)
    want_eval, _ = _reference_step(model, x, state)
    model.train()  # dropout applies inside the blocks: the step must run them
    with torch.no_grad():
        y, _ = model.step(x, state, inplace=True)
    assert counted.calls == 0
    assert not torch.allclose(y, want_eval), "dropout did not apply in train mode"


def test_grad_mode_between_steps_falls_back():
    model = _model()
    state, counted = _bind(model)
    x = torch.randn(2, E)
    want, _ = _reference_step(model, x, state)
    y, _ = model.step(x, state, inplace=True)  # grad enabled, parameters require grad
    assert counted.ran == 0  # the call declined
    assert y.grad_fn is not None
    assert_close(y, want)


def test_autocast_between_steps_falls_back():
    model = _model()
    state, counted = _bind(model)
    x = torch.randn(2, E)
    before = state.clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = model.step(x, state, inplace=True)
        with block_by_block(model):
            want, _ = model.step(x, before, inplace=True)
    assert counted.ran == 0  # the call declined
    assert torch.equal(y, want)


def test_a_compiled_step_of_a_bound_state_gives_way_to_the_traced_step():
    # eager steps bind the state; the compiled step of the same state must trace the block-by-block
    # step (a call into the bound C++ step would break the graph: fullgraph raises)
    torch._dynamo.reset()
    model = _model()
    state, counted = _bind(model, max_len=16)
    x = torch.randn(2, E)
    want, want_state = _reference_step(model, x, state)
    step = torch.compile(model.step, fullgraph=True, backend="eager")
    with torch.no_grad():
        y, _ = step(x, state, inplace=True)
    assert counted.calls == 0
    assert_close(y, want)
    assert_tree_close(state, want_state)


# -- states: another state, another batch, a full cache ---------------------------------------------
def test_another_state_of_the_same_shape_is_stepped_not_the_bound_one():
    model = _model()
    state, counted = _bind(model)
    other = model.init_state(2)
    with torch.no_grad():
        for _ in range(2):
            model.step(torch.randn(2, E), other, inplace=True)
    before = state.clone()
    x = torch.randn(2, E)
    want, want_other = _reference_step(model, x, other)
    with torch.no_grad():
        y, out = model.step(x, other, inplace=True)
    assert out is other
    assert_close(y, want)
    assert_tree_close(other, want_other)
    assert_tree_close(state, before)
    assert counted.calls == 0  # the binding moved to `other`
    assert model.__dict__[BOUND_KEY].state is other


def test_a_frame_of_another_batch_or_width_raises_as_before():
    model = _model()
    state, counted = _bind(model)
    with torch.no_grad():
        with pytest.raises(ValueError, match="batch size"):
            model.step(torch.randn(3, E), state, inplace=True)
        with pytest.raises(ValueError, match="embed_dim"):
            model.step(torch.randn(2, E + 1), state, inplace=True)
        with pytest.raises(ValueError, match="dtype"):
            model.step(torch.randn(2, E, dtype=torch.float64), state, inplace=True)
        y, _ = model.step(torch.randn(2, 1, E), state, inplace=True)  # [B, 1, E] is a frame too
    assert y.shape == (2, 16) and counted.ran == 1


def test_a_full_cache_in_any_row_raises_before_anything_is_written():
    model = _model()
    state, counted = _bind(model, B=2, steps=2, max_len=3)
    with torch.no_grad():
        model.step(torch.randn(2, E), state, reset=torch.tensor([True, False]), inplace=True)
        assert state.pos.tolist() == [1, 3]  # row 1 is full, row 0 is not
        before = state.clone()
        with pytest.raises(ValueError, match="attention cache full: max_len=3"):
            model.step(torch.randn(2, E), state, inplace=True)
    assert_tree_close(state, before)


# -- copies --------------------------------------------------------------------------------------------
def test_copies_and_pickles_of_a_bound_model_carry_no_binding():
    model = _model()
    state, counted = _bind(model)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.__dict__.get(BOUND_KEY) is None and "_state_ok" not in twin.__dict__
        with torch.no_grad():
            twin.blocks[0].mixer.out_proj.weight.mul_(2.0)  # never seen by the original
            twin_state = state.clone()
            for _ in range(2):
                y_twin, _ = twin.step(torch.ones(2, E), twin_state, inplace=True)
            assert twin.__dict__[BOUND_KEY].state is twin_state
    x = torch.ones(2, E)
    want, _ = _reference_step(model, x, state)
    with torch.no_grad():
        y, _ = model.step(x, state, inplace=True)
    assert counted.ran == 1
    assert_close(y, want)
    assert not torch.allclose(y, y_twin)
