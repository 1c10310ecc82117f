"""The one-call model step (hybridssm.streaming) on Mamba stacks: the model takes it (and falls back
where it must), it never goes stale under any way of writing a parameter, and the memoised step
checks still reject bad inputs and states."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hybridssm as hs
from conformance_cases import tiny_cases
from helpers import assert_close, assert_stream_equals_forward, assert_tree_close, block_by_block, stream
from hybridssm.ops import use_kernels
from hybridssm.state import ModelState
from hybridssm.streaming import plan as plan_mod

E_IN, D, N, K = 6, 16, 4, 4


def _model(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    opts = dict(embed_dim=E_IN, hidden_size=D, num_layers=2, state_size=N, conv_size=K)
    m = hs.build("mamba", **{**opts, **kw}).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms, conv bias and D so every weight matters
        for name, p in m.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "conv.bias", ".D")):
                p.add_(0.3 * torch.randn_like(p))
    return m


def _assert_stream_equals_forward(model, B=2, T=9, msg=""):
    assert_stream_equals_forward(model, torch.randn(B, T, E_IN, dtype=model.input_proj.weight.dtype), msg)


@pytest.fixture
def count_stack_calls(monkeypatch):
    """Counts the steps the one-call plan ran (a run that does not apply returns None)."""
    calls = []
    real = plan_mod.StepPlan.run

    def counted(self, *args, **kw):
        out = real(self, *args, **kw)
        if out is not None:
            calls.append(1)
        return out

    monkeypatch.setattr(plan_mod.StepPlan, "run", counted)
    return calls


# -- the model takes the one-call path, and leaves it where it must --------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_model_step_takes_one_call_and_equals_forward(dtype, count_stack_calls):
    model = _model(dtype)
    _assert_stream_equals_forward(model, msg=str(dtype))
    assert len(count_stack_calls) == 2 * 9  # every step, inplace and functional


def test_one_call_equals_block_by_block():
    model = _model()
    x = torch.randn(2, 7, E_IN)
    with torch.no_grad():
        fused, s_fused = stream(model, x, inplace=True)
        with block_by_block(model):
            plain, s_plain = stream(model, x, inplace=True)
    assert_close(fused, plain)
    assert_tree_close(s_fused, s_plain)


def test_functional_one_call_leaves_the_state_alone():
    model = _model()
    x = torch.randn(2, 5, E_IN)
    with torch.no_grad():
        _, state = stream(model, x, inplace=True)
        before = state.clone()
        y, new = model.step(x[:, 0], state)
    assert_tree_close(state, before)
    assert new is not state and new.pos.tolist() == [6, 6]
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(new.layers[0], state.layers[0]))


def test_inplace_step_hands_back_the_same_state():
    model = _model()
    state = model.init_state(1)
    with torch.no_grad():
        for fused in (True, False):
            model.use_fused_step = fused
            _, out = model.step(torch.randn(1, E_IN), state, inplace=True)
            assert out is state
    model.use_fused_step = True
    assert state.pos.tolist() == [2]


@pytest.mark.parametrize("case", ["grad", "autocast", "torch_kernels", "dropout_training"])
def test_falls_back_where_the_one_call_does_not_apply(case, count_stack_calls):
    model = _model(dropout=0.1 if case == "dropout_training" else 0.0)
    x = torch.randn(2, 5, E_IN)
    if case == "grad":  # autograd through the step: the generic (differentiable) path
        _, state = stream(model, x, inplace=True)
        assert state.layers[0].ssm.grad_fn is not None
    elif case == "autocast":
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            stream(model, x, inplace=True)
    elif case == "torch_kernels":
        with torch.no_grad(), use_kernels("torch"):
            _assert_stream_equals_forward(model)
    else:  # dropout between blocks is active in training mode
        model.train()
        with torch.no_grad():
            stream(model, x, inplace=True)
    assert count_stack_calls == []


def test_training_mode_without_active_dropout_keeps_the_one_call(count_stack_calls):
    model = _model().train()  # dropout 0: training mode changes nothing in the step
    _assert_stream_equals_forward(model)
    assert len(count_stack_calls) == 2 * 9
    model.dropout.p = 0.1  # set after the plan was built: seen at the next step
    with torch.no_grad():
        stream(model, torch.randn(1, 2, E_IN), inplace=True)
    assert len(count_stack_calls) == 2 * 9


def test_hybrid_with_mamba_blocks_streams_exactly():
    """Attention blocks between the Mamba blocks: one call where every kind has a kernel, else block
    by block (each Mamba mixer still fused); the same values either way."""
    torch.manual_seed(0)
    model = hs.build("hybrid", embed_dim=E_IN, hidden_size=D, num_layers=2, num_heads=2, state_size=N,
                     backbone="mamba", attention_every=2).eval()
    x = torch.randn(2, 6, E_IN)
    with torch.no_grad():
        want = model(x, return_sequence=True)
        got, _ = stream(model, x, inplace=True)
    assert_close(got, want)


# -- nothing goes stale: every way of writing a parameter is seen by the next step ------------------
def _warm(model):
    with torch.no_grad():
        stream(model, torch.randn(1, 3, E_IN, dtype=model.input_proj.weight.dtype), inplace=True)


def _mutations():
    def add_inplace(m):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def optimizer_step(m):
        opt = torch.optim.SGD(m.parameters(), lr=1.0, momentum=0.9)
        for p in m.parameters():  # gradients large enough to move A_log visibly (its own are tiny)
            p.grad = 0.05 * torch.randn_like(p)
        opt.step()

    def adam_foreach_step(m):
        opt = torch.optim.Adam(m.parameters(), lr=0.1, foreach=True)
        m(torch.randn(2, 4, E_IN)).pow(2).sum().backward()
        opt.step()

    def other_weights(seed):
        src = _model(seed=seed)
        with torch.no_grad():  # A_log starts the same in every model (S4D-real): move it
            for p in src.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return src.state_dict()

    def load_state_dict(m):
        m.load_state_dict(other_weights(1))

    def load_state_dict_assign(m):
        m.load_state_dict(other_weights(2), assign=True)

    def replace_data(m):
        for blk in m.blocks:
            blk.mixer.ssm.A_log.data = blk.mixer.ssm.A_log.data + 0.3

    def copy_into_data(m):  # EMA / target-network updates: .data bypasses the version counter
        for blk in m.blocks:
            blk.mixer.ssm.A_log.data.copy_(blk.mixer.ssm.A_log.data * 1.2)
            blk.mixer.in_proj.weight.data.mul_(0.5)

    def replace_module(m):
        for blk in m.blocks:
            old = blk.mixer.out_proj
            blk.mixer.out_proj = nn.Linear(old.in_features, old.out_features, bias=False)
            with torch.no_grad():
                blk.mixer.ssm.A_log.add_(0.1)

    def replace_parameter(m):
        for blk in m.blocks:
            blk.mixer.ssm.A_log = nn.Parameter(blk.mixer.ssm.A_log.detach() - 0.3)

    def to_float64_and_back(m):
        m.to(torch.float64)
        with torch.no_grad():
            for blk in m.blocks:
                blk.mixer.ssm.A_log.mul_(1.1)
        m.to(torch.float32)

    return [add_inplace, optimizer_step, adam_foreach_step, load_state_dict, load_state_dict_assign,
            replace_data, copy_into_data, replace_parameter, replace_module, to_float64_and_back]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_step_follows_parameter_changes(mutate, count_stack_calls):
    model = _model()
    _warm(model)  # fills the caches
    A_log = [blk.mixer.ssm.A_log.detach().clone() for blk in model.blocks]
    mutate(model)
    model.eval()
    for blk, before in zip(model.blocks, A_log):  # the mutation reached A_log (what the cache derives)
        assert not torch.equal(blk.mixer.ssm.A_log.detach(), before)
    _assert_stream_equals_forward(model, msg=mutate.__name__)
    assert count_stack_calls  # the one-call path ran with the new weights


def test_step_follows_a_cast_to_float64(count_stack_calls):
    model = _model()
    _warm(model)
    model.to(torch.float64)
    _assert_stream_equals_forward(model)
    assert count_stack_calls


# -- the memoised checks still check ----------------------------------------------------------------
def test_memoised_checks_still_reject_bad_inputs_and_states():
    model = _model()
    with torch.no_grad():
        state = model.init_state(2)
        model.step(torch.randn(2, E_IN), state, inplace=True)  # memoises this input kind and state
        with pytest.raises(ValueError, match="embed_dim"):
            model.step(torch.randn(2, E_IN + 1), state, inplace=True)
        with pytest.raises(ValueError, match="dtype"):
            model.step(torch.randn(2, E_IN, dtype=torch.float64), state, inplace=True)
        with pytest.raises(ValueError, match="batch size"):
            model.step(torch.randn(3, E_IN), state, inplace=True)
        bad = ModelState((state.layers[0], model.init_state(3).layers[1]), state.pos)
        with pytest.raises(ValueError, match="shape"):
            model.step(torch.randn(2, E_IN), bad, inplace=True)
        other = hs.build("mamba", embed_dim=E_IN, hidden_size=D + 4, num_layers=2).eval()
        with pytest.raises(ValueError, match="shape"):
            model.step(torch.randn(2, E_IN), other.init_state(2), inplace=True)
        # after the model moves to float64, float32 frames are refused again
        model.to(torch.float64)
        with pytest.raises(ValueError, match="dtype"):
            model.step(torch.randn(2, E_IN), model.init_state(2), inplace=True)


def test_reset_rows_in_the_one_call_path(count_stack_calls):
    model = _model()
    x = torch.randn(2, 6, E_IN)
    with torch.no_grad():
        state = model.init_state(2)
        for t in range(3):
            model.step(x[:, t], state, inplace=True)
        reset = torch.tensor([True, False])
        y, out = model.step(x[:, 3], state, reset=reset, inplace=True)
        assert out is state and state.pos.tolist() == [1, 4]
        want_row0 = model(x[:1, 3:4])
        want_row1 = model(x[1:, :4])
    assert_close(y[:1], want_row0)
    assert_close(y[1:], want_row1)
    assert count_stack_calls


def test_deepcopy_and_pickle_keep_the_step_exact(tmp_path):
    import copy

    model = _model()
    _warm(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.blocks[0].mixer.ssm.A_log.add_(0.2)  # must not leak into the original's step
    _assert_stream_equals_forward(model, msg="original")
    _assert_stream_equals_forward(twin, msg="copy")
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    _assert_stream_equals_forward(loaded, msg="pickled")


# -- a stream that starts from a prefill (the real-time case) takes the one-call step ---------------
@pytest.mark.parametrize("case", [c for c in tiny_cases()], ids=str)
def test_a_prefilled_state_streams_through_the_fused_plan(case, monkeypatch):
    # forward(return_state=True) hands back contiguous buffers, which the fused step writes in place
    # (a conv window sliced from the chunk would otherwise send every later step to the slow path)
    model = case.build().eval()
    if plan_mod.plan_status(model) != "fused":
        pytest.skip(f"no fused plan: {plan_mod.plan_status(model)}")
    ran = []
    original = plan_mod.StepPlan.run

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(plan_mod.StepPlan, "run", spy)
    x = torch.randn(2, 7, model.config.embed_dim)
    with torch.inference_mode():
        want = model(x, return_sequence=True)
        _, state = model(x[:, :5], return_state=True)
        assert all(t.is_contiguous() for t in torch.utils._pytree.tree_leaves(state))
        ys = []
        for t in (5, 6):
            y, state = model.step(x[:, t], state, inplace=True)
            ys.append(y)
    assert ran and all(ran), "the inplace step after a prefill fell back to the block-by-block path"
    assert_close(torch.stack(ys, 1), want[:, 5:])


# -- tokens that enter at the blocks (Hymba's meta tokens) through the plan --------------------------
def _hymba(**kw):
    torch.manual_seed(0)
    return hs.build("hymba", embed_dim=E_IN, hidden_size=D, num_layers=2, num_heads=2, num_meta_tokens=3,
                    state_size=N, window_size=4, global_layers=(0,), **kw).eval()


def test_hymba_meta_prefill_runs_through_the_plan_with_the_forward_values(monkeypatch):
    # every reset of a stream builds this state: the plan's frames equal the blocks' forward over
    # the meta tokens (state and the stream that follows), and the position stays 0
    model = _hymba()
    prefills = []
    real = plan_mod.StepPlan.prefill

    def counted(self, *args, **kw):
        out = real(self, *args, **kw)
        prefills.append(out)
        return out

    monkeypatch.setattr(plan_mod.StepPlan, "prefill", counted)
    x = torch.randn(3, 6, E_IN)
    with torch.no_grad():
        fused = model.init_state(3, max_len=12)
        assert prefills == [True]
        with block_by_block(model):
            want = model.init_state(3, max_len=12)
    assert fused.pos.tolist() == [0, 0, 0]
    assert_tree_close(fused, want)
    with torch.no_grad():
        got, _ = stream(model, x, fused, inplace=True)
        assert_close(got, model(x, return_sequence=True))


@pytest.mark.parametrize("where", ["grad", "dropout", "fused_step_off"])
def test_hymba_meta_prefill_falls_back_to_the_forward(where):
    # with a gradient to keep (training through init_state), active dropout, or the fused step off,
    # the plan declines without writing, and init_state runs the blocks' forward (keeping the graph)
    model = _hymba(dropout=0.2).train() if where == "dropout" else _hymba()
    model.use_fused_step = where != "fused_step_off"
    zero = hs.SequenceModel.init_state(model, 1, max_len=8)
    with torch.set_grad_enabled(where == "grad"):
        assert plan_mod.prefill_blocks(model, model.meta_embedding.unsqueeze(0), zero) is False
        state = model.init_state(2, max_len=8)
    assert all(not t.any() for t in torch.utils._pytree.tree_leaves(zero))
    leaves = torch.utils._pytree.tree_leaves(state.layers)
    assert any(t.requires_grad for t in leaves) == (where == "grad")
    assert any(t.any() for t in leaves if t.is_floating_point())
