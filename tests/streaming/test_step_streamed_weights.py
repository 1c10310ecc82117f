"""A model whose weights exceed what stays in cache between steps (common.h's kStreamedWeightBytes,
8 MiB) runs its batch-1 products on the streamed-weights GEMV (4 rows of W at a time): its one-call
step still equals the forward, in place and not (tests/ops/test_step_linear.py holds that GEMV to
the 8-row one bit for bit)."""

from __future__ import annotations

import torch

import hybridssm as hs
from helpers import assert_stream_equals_forward
from hybridssm.streaming import plan as plan_mod


def test_step_of_a_model_beyond_the_cache_equals_forward():
    torch.manual_seed(0)
    # ~12.6 MB of fp32 weights: beyond the 8 MiB threshold
    model = hs.build("transformer", embed_dim=256, hidden_size=256, dropout=0.0).eval()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert nbytes > 8 << 20, nbytes
    assert_stream_equals_forward(model, torch.randn(1, 6, 256))
    assert plan_mod.plan_status(model) == "fused"
