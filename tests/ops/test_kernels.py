"""The backend dispatcher: forcing, auto fallback with one warning, and the report."""

from __future__ import annotations

import contextlib
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


def test_use_kernels_belongs_to_the_calling_thread():
    import threading

    inside, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with hs.use_kernels("ref"):
            seen["worker"] = _kernels.current_backend()
            inside.set()
            release.wait(30)
        seen["worker after"] = _kernels.current_backend()

    before = _kernels.current_backend()
    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(30)
    seen["main"] = _kernels.current_backend()  # while the worker is inside its block
    with hs.use_kernels("torch"):
        seen["main forced"] = _kernels.current_backend()
    release.set()
    t.join(30)
    assert seen == {"worker": "ref", "main": before, "main forced": "torch", "worker after": before}


def test_failed_builds_warn_once_in_all(monkeypatch):
    # Two ops whose kernels fail to build: one warning for the process, naming the way out.
    monkeypatch.setattr(_kernels, "_WARNED", set())

    def probe(device_type):
        raise RuntimeError("no compiler")

    for op in ("_broken_a", "_broken_b"):
        _kernels.register(op, ref=lambda: "ref", torch_impl=lambda: "torch", fused=lambda: "fused",
                          fused_probe=probe)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _kernels.get("_broken_a")() == "torch"
            assert _kernels.get("_broken_b")() == "torch"
        assert len(caught) == 1
        assert "HYBRIDSSM_KERNELS=torch" in str(caught[0].message) and "no compiler" in str(caught[0].message)
        assert hs.kernels()["_broken_b"]["reason"] == "build failed: no compiler"
    finally:
        del _kernels._OPS["_broken_a"], _kernels._OPS["_broken_b"]


def test_export_traces_the_torch_forms(monkeypatch):
    # Under torch.export an exported program must not need the fused kernels: auto picks torch.
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    with hs.use_kernels("auto"):
        assert _kernels.resolve("selective_scan", "cpu")[0] == "torch"
    with hs.use_kernels("ref"):
        assert _kernels.resolve("selective_scan", "cpu")[0] == "ref"


@contextlib.contextmanager
def _op_with_peeking_probe(name):
    """Registers op ``name`` whose fused probe (as the C++ kernels') records each build and has a
    peek that builds nothing; yields the list of builds; unregisters it on exit."""
    calls = []

    def probe(device_type):
        calls.append(device_type)
        return True, "built"

    probe.peek = lambda device_type: (None, "not built yet")
    _kernels.register(name, ref=lambda: "ref", torch_impl=lambda: "torch", fused=lambda: "fused",
                      fused_probe=probe)
    try:
        with hs.use_kernels("auto"):
            yield calls
    finally:
        del _kernels._OPS[name]


def test_kernels_report_does_not_probe_a_kernel_with_a_peek():
    # A probe with a peek (the C++ kernels') is asked without building: hs.kernels() never builds.
    with _op_with_peeking_probe("_peek_op") as calls:
        assert hs.kernels()["_peek_op"] == {"backend": "fused", "reason": "not built yet",
                                            "available": "ref, torch, fused"}
        assert calls == []
        assert _kernels.get("_peek_op")() == "fused" and calls == ["cpu"]
        assert hs.kernels()["_peek_op"]["reason"] == "built"


def test_kernels_report_builds_on_request():
    with _op_with_peeking_probe("_build_op") as calls:
        assert hs.kernels(build=True)["_build_op"]["reason"] == "built" and calls == ["cpu"]


def test_kernel_op_registers_forward_fake_and_backward(monkeypatch):
    # A stand-in "extension": y = 3 x + s (and x itself as the checkpoint), backward dx = 3 dy, ds = dy;
    # `finish` doubles ds, so the test sees that it ran.
    from types import SimpleNamespace

    from hybridssm.ops import _custom_op

    ext = SimpleNamespace(
        fwd=lambda x, s, save: (3 * x + s, x.clone() if save else x.new_empty(0)),
        bwd=lambda dy, ckpt: (3 * dy, dy.clone()),
    )
    monkeypatch.setattr(_custom_op, "load_extension", lambda name: ext)
    op = _custom_op.kernel_op(
        "_test_triple", extension="unused", kernel="fwd",
        schema="(Tensor x, Tensor s, bool save) -> (Tensor, Tensor)",
        fake=lambda x, s, save: (torch.empty_like(x), x.new_empty(x.shape if save else (0,))),
        backward=_custom_op.Backward(
            kernel="bwd", schema="(Tensor dy, Tensor ckpt) -> (Tensor, Tensor)",
            fake=lambda dy, ckpt: (torch.empty_like(dy), torch.empty_like(dy)),
            save=lambda inputs, outputs: (outputs[1],), grads=1, checkpoint=1,
            finish=lambda saved, grads: (grads[0], 2 * grads[1]),  # the PyTorch part of a backward
        ),
    )
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y, _ = op(x, s, True)
    assert torch.equal(y, 3 * x + s)
    dx, ds = torch.autograd.grad(y.sum(), (x, s))
    assert torch.equal(dx, torch.full_like(x, 3.0)) and torch.equal(ds, torch.full_like(s, 2.0))
    with pytest.raises(RuntimeError, match="_test_triple ran with save=False"):
        op(x, s, False)[0].sum().backward()
    with torch._subclasses.fake_tensor.FakeTensorMode():  # the fake gives shapes without the kernel
        fy, fckpt = op(torch.empty(5, 2), torch.empty(5, 2), True)
        assert fy.shape == (5, 2) and fckpt.shape == (5, 2)


def test_kernels_report_lists_the_streaming_step():
    """The streaming step's extension (one C++ call per model step) is listed beside the ops, with
    its backend and why, without building it."""
    from hybridssm.ops.step import fused_step_available

    with hs.use_kernels("torch"):
        assert hs.kernels()["streaming_step"] == {"backend": "torch", "reason": "forced",
                                                  "available": "ref, torch, fused"}
    assert hs.kernels("cuda")["streaming_step"]["reason"] == "the fused streaming step runs on CPU only"
    with hs.use_kernels("auto"):
        expected = "fused" if fused_step_available() else "torch"  # builds or loads it
        report = hs.kernels()["streaming_step"]
    assert report["backend"] == expected
    assert report["reason"].startswith("fused C++ kernel" if expected == "fused" else "build failed")
    with pytest.raises(RuntimeError, match="streaming_step.*selects its form itself"):
        _kernels.get("streaming_step")


def test_misspelt_backend_variable_warns_at_import(tmp_path):
    """A ``HYBRIDSSM_KERNELS`` value outside auto|fused|torch|ref is named at ``import hybridssm``
    (configs still work), and the first op raises the same message. (A fresh process, forked from
    one that imported torch but not hybridssm: tests/forked.py.)"""
    import os

    import forked

    (tmp_path / "probe.py").write_text(
        "import hybridssm as hs, torch\n"
        "hs.get_config_class('gated_ssm')(embed_dim=3)\n"
        "print('imported')\n"
        "hs.build('gated_ssm', embed_dim=3, hidden_size=4)(torch.randn(1, 2, 3))\n")
    run = forked.start(tmp_path / "probe.py", env={**os.environ, "HYBRIDSSM_KERNELS": "fusd"})
    stdout, stderr = run.communicate(timeout=300)
    message = "HYBRIDSSM_KERNELS must be one of auto, fused, torch, ref; got 'fusd'"
    before, _, after = stderr.partition("Traceback")
    assert "UserWarning" in before and message in before and "every op will raise" in before
    assert stdout == "imported\n" and run.returncode != 0
    assert f"ValueError: {message}" in after


def test_the_fused_status_is_marked_constant_as_torch_compiler_marks_it():
    # the mark is set by hand so that `import hybridssm` loads no compiler stack; it must stay what
    # torch.compiler.assume_constant_result sets, or compiled steps recompile at frame 2 again
    def probe():
        return None

    before = set(vars(probe))
    torch.compiler.assume_constant_result(probe)
    assert set(vars(probe)) - before == {_kernels._CONSTANT_MARK}
    assert getattr(_kernels._fused_status, _kernels._CONSTANT_MARK) is True
