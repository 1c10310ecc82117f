"""Padding never reaches valid results, whatever its values: NaN or Inf in the padded tail of a
``lengths=`` batch leaves every valid output and the returned state as with zero padding."""

from __future__ import annotations

import pytest
import torch

from conformance_cases import tiny_cases
from helpers import assert_close, assert_tree_close


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", tiny_cases(), ids=str)
def test_non_finite_padding_leaves_valid_outputs_and_states_unchanged(case, fill):
    model = case.build().eval()
    torch.manual_seed(0)
    B, T = 3, 9
    lengths = torch.tensor([9, 4, 6])
    x = torch.randn(B, T, model.config.embed_dim)
    pad = torch.arange(T).unsqueeze(0) >= lengths.unsqueeze(1)
    clean = x.masked_fill(pad.unsqueeze(-1), 0.0)
    dirty = x.masked_fill(pad.unsqueeze(-1), fill)
    with torch.no_grad():
        want_seq, want_state = model(clean, lengths=lengths, return_sequence=True, return_state=True)
        got_seq, got_state = model(dirty, lengths=lengths, return_sequence=True, return_state=True)
        want_last = model(clean, lengths=lengths)
        got_last = model(dirty, lengths=lengths)
    for t in (got_seq, got_last, *torch.utils._pytree.tree_leaves(got_state)):
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{case}: a non-finite value reached the results"
    assert_close(got_seq, want_seq)
    assert_close(got_last, want_last)
    assert_tree_close(got_state, want_state)
