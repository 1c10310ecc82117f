"""The backend dispatcher: forcing, auto fallback with one warning, and the report."""

from __future__ import annotations

import warnings

import pytest
import torch

import hybridssm as hs
from hybridssm.ops import _kernels


def test_use_kernels_forces_and_restores():
    calls = []
    _kernels.register(
        "_probe_op",
        ref=lambda: calls.append("ref"),
        torch_impl=lambda: calls.append("torch"),
    )
    _kernels.get("_probe_op")()
    with hs.use_kernels("ref"):
        _kernels.get("_probe_op")()
        with hs.use_kernels("torch"):
            _kernels.get("_probe_op")()
        _kernels.get("_probe_op")()
    assert calls == ["torch", "ref", "torch", "ref"]
    with pytest.raises(ValueError, match="use_kernels.*auto, fused, torch, ref"):
        with hs.use_kernels("cuda"):
            pass
    with hs.use_kernels("fused"), pytest.raises(RuntimeError, match="_probe_op.*unavailable"):
        _kernels.get("_probe_op")
    del _kernels._OPS["_probe_op"]


def test_failed_fused_build_falls_back_with_one_warning():
    def probe(device_type):
        raise RuntimeError("compiler exploded")

    _kernels.register(
        "_broken_op", ref=lambda: "ref", torch_impl=lambda: "torch", fused=lambda: "fused",
        fused_probe=probe,
    )
    with pytest.warns(UserWarning, match="_broken_op: build failed: compiler exploded"):
        assert _kernels.get("_broken_op")() == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _kernels.get("_broken_op")() == "torch"  # warned once only
    report = hs.kernels()["_broken_op"]
    assert report["backend"] == "torch" and "compiler exploded" in report["reason"]
    del _kernels._OPS["_broken_op"]


def test_kernels_report_lists_every_op():
    report = hs.kernels()
    for op in ("causal_conv1d", "linear_rnn"):
        assert report[op]["backend"] in ("fused", "torch")
        assert "ref" in report[op]["available"]


def test_model_runs_identically_on_ref_backend():
    from helpers import assert_close

    m = hs.build("gated_ssm", embed_dim=3, hidden_size=8).eval()
    x = torch.randn(2, 11, 3)
    with torch.no_grad():
        fast = m(x, return_sequence=True)
        with hs.use_kernels("ref"):
            ref = m(x, return_sequence=True)
    assert_close(fast, ref)
