"""The fused scan splits (batch, channel) work across threads: with two threads it still equals the
reference (the rest of the suite runs on one intra-op thread)."""

from __future__ import annotations

import torch
from test_scan import NAMES, _inputs, _run

from helpers import assert_close


def test_fused_scan_multithreaded_equals_ref():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        inp = _inputs(3, 37, 29, 16)
        y, h, grads = _run("fused", inp)
    finally:
        torch.set_num_threads(n)
    y_ref, h_ref, grads_ref = _run("ref", inp)
    assert_close(y, y_ref)
    assert_close(h, h_ref)
    for name, a, b in zip(NAMES, grads, grads_ref):
        assert_close(a, b, msg=f"grad {name}")
