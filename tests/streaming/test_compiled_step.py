"""A compiled in-place step, as a real-time loop runs it (``inplace=True``, rows reset as episodes
end, under ``inference_mode``), compiles once and gives the eager step's outputs: a recompile at a
later frame would stall the loop for seconds. The functional step is covered for every model by
the conformance suite (``test_compile_forward_and_step``)."""

from __future__ import annotations

import pytest
import torch

from conformance_cases import Case, every_state_kind_case, tiny_cases
from helpers import assert_close, assert_tree_close

CASES = [c for c in tiny_cases() if not c.variant]
# One model that holds every kind of state runs by default (a reset there re-runs meta tokens).
PARAMS = [every_state_kind_case()] + [pytest.param(c, marks=pytest.mark.slow) for c in CASES]


@pytest.mark.parametrize("case", PARAMS, ids=lambda c: c.id)
def test_compiled_inplace_step_with_resets_compiles_once(case: Case):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = case.build().eval()
    B, T, max_len = 3, 7, 16
    x = torch.randn(B, T, model.config.embed_dim)
    step = torch.compile(model.step, fullgraph=True, backend="eager")  # guards are dynamo's alone
    with torch.inference_mode():
        want, got = model.init_state(B, max_len=max_len), model.init_state(B, max_len=max_len)
        for t in range(T):
            done = torch.tensor([t == 3, t == 5, False])
            y, want = model.step(x[:, t], want, reset=done, inplace=True)
            with torch.compiler.set_stance("fail_on_recompile" if t else "default"):
                y_c, got = step(x[:, t], got, reset=done, inplace=True)
            assert_close(y_c, y, msg=f"{case.id}: compiled in-place step at t={t}")
        assert_tree_close(got, want)
