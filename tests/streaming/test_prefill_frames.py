"""The plan's prefill (``csrc/step/prefill.h``): tokens entering at the blocks, such as Hymba's meta
tokens on every reset, run each mixer's projections over all frames at once (each weight read once)
and only the recurrence frame by frame. Up to 4 rows a frame its values are those of the same frames
as plain steps, bit for bit; a mixer kind without a several-frames entry runs frame by frame."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import hybridssm as hs
from helpers import assert_tree_close
from hybridssm.streaming import plan as step_plan

# Hymba at 32 wide (see test_step_many_streams.py: torch's element-wise tails); a window of 4 that
# the longer prefills wrap, and dt rank 2 (a partial SIMD vector in the dt projection).
HYMBA = dict(embed_dim=6, hidden_size=32, num_layers=2, num_heads=2, num_meta_tokens=3, window_size=4,
             global_layers=(1,))


def _hymba(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return hs.build("hymba", **{**HYMBA, **kw}).to(dtype).eval()


def _prefill(model, h, state, by_frame):
    """``h [B, T, hidden]`` through the blocks from a copy of ``state``: (outputs, the new state).
    ``by_frame``: as T plain steps of the blocks (the reference)."""
    state = state.clone()
    cpp = step_plan._entry(model).plan._cpp
    y = cpp.prefill(h, pytree.tree_leaves(state.layers), state.pos.clone(), by_frame=by_frame)
    return y, state


def _assert_equal(a, b, msg):
    for x, y in zip(pytree.tree_leaves(a), pytree.tree_leaves(b), strict=True):
        assert torch.equal(x, y), msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 2, 4])
@pytest.mark.parametrize("frames", [1, 3, 6])
def test_prefill_equals_the_same_frames_as_steps_exactly(dtype, batch, frames):
    # 6 frames: more rows than gemv_rows_multi takes, and the window's ring wraps
    model = _hymba(dtype)
    with torch.no_grad():
        state = model.init_state(batch, max_len=16)
        for _ in range(2):  # rows at their own positions, caches partly filled
            model.step(torch.randn(batch, 6, dtype=dtype), state, inplace=True)
        h = torch.randn(batch, frames, 32, dtype=dtype)
        y, got = _prefill(model, h, state, by_frame=False)
        y_ref, want = _prefill(model, h, state, by_frame=True)
    assert torch.equal(y, y_ref)
    _assert_equal(got, want, f"B={batch} T={frames}")


def test_prefill_of_many_rows_a_frame_is_close_to_steps():
    # more than 4 rows a frame: the block's row-wise GEMMs take every frame at once (other sums)
    model = _hymba()
    with torch.no_grad():
        state = model.init_state(5, max_len=16)
        h = torch.randn(5, 3, 32)
        y, got = _prefill(model, h, state, by_frame=False)
        y_ref, want = _prefill(model, h, state, by_frame=True)
    torch.testing.assert_close(y, y_ref)
    assert_tree_close(got, want)


@pytest.mark.parametrize("backbone", ["gru", "mamba"])
def test_a_mixer_without_a_frames_entry_runs_frame_by_frame(backbone):
    # gru has no several-frames entry (frame by frame); the attention and mamba layers have theirs
    torch.manual_seed(0)
    model = hs.build("hybrid", embed_dim=6, hidden_size=20, num_layers=2, num_heads=2, head_dim=10,
                     attention_every=2, backbone=backbone).eval()
    with torch.no_grad():
        state = model.init_state(1)
        h = torch.randn(1, 5, 20)
        y, got = _prefill(model, h, state, by_frame=False)
        y_ref, want = _prefill(model, h, state, by_frame=True)
    assert torch.equal(y, y_ref)
    _assert_equal(got, want, backbone)


def test_prefill_past_a_full_cache_is_refused_before_the_cache_is_written():
    model = _hymba(global_layers=None)  # every layer full attention
    with torch.no_grad():
        state = model.init_state(1, max_len=2)  # 3 meta tokens + 2 slots
        caches = [pytree.tree_map(torch.clone, layer.attn) for layer in state.layers]
        leaves = pytree.tree_leaves(state.layers)
        with pytest.raises(RuntimeError, match="cannot take 3 more frames"):
            step_plan._entry(model).plan._cpp.prefill(torch.randn(1, 3, 32), leaves, state.pos.clone())
    # the first layer's attention refused before it wrote a key (its Mamba path had run)
    _assert_equal(state.layers[0].attn, caches[0], "layer 0's attention state")
    _assert_equal(state.layers[1].attn, caches[1], "layer 1's attention state")
