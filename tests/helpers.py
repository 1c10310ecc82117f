"""The one comparison helper and its tolerance classes (DESIGN §4). No per-test tolerances."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

__all__ = ["assert_close", "assert_tree_close", "assert_bitwise", "block_by_block", "stream"]

# precision class -> relative tolerance; atol scales with the expected values' magnitude.
#   fp32: CPU fp32 against fp32 (fast form vs reference, stream vs forward)
#   fp64: gradcheck-sized fp64 runs
#   bf16: a bf16-autocast run against the fp32 run of the same model
_RTOL = {"fp32": 1e-5, "fp64": 1e-10, "bf16": 5e-2}


def assert_close(actual: Tensor, expected: Tensor, cls: str = "fp32", msg: str = "") -> None:
    """``assert_close(actual, expected, rtol=r, atol=r * |expected|.max() + 1e-6)``."""
    rtol = _RTOL[cls]
    expected = expected.detach()
    actual = actual.detach()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    atol = rtol * scale + (1e-6 if cls != "fp64" else 1e-12)
    torch.testing.assert_close(
        actual.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}"
    )


def assert_tree_close(actual, expected, cls: str = "fp32", msg: str = "") -> None:
    """:func:`assert_close` over two pytrees of tensors (states)."""
    from torch.utils import _pytree as pytree

    a, spec_a = pytree.tree_flatten(actual)
    e, spec_e = pytree.tree_flatten(expected)
    assert spec_a == spec_e, f"{msg}: structures differ\n{spec_a}\n{spec_e}"
    for i, (x, y) in enumerate(zip(a, e)):
        if isinstance(y, Tensor) and y.is_floating_point():
            assert_close(x, y, cls, f"{msg} (leaf {i})")
        elif isinstance(y, Tensor):
            assert torch.equal(x, y), f"{msg} (leaf {i}): {x} != {y}"
        else:
            assert x == y, f"{msg} (leaf {i})"


def assert_bitwise(actual: Tensor, expected: Tensor, msg: str = "") -> None:
    assert torch.equal(actual, expected), msg or "tensors differ bitwise"


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def benchmark_script(name: str) -> Iterator[ModuleType]:
    """``benchmarks/NAME.py`` imported as module ``NAME`` (registered in ``sys.modules`` while in use:
    dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


@contextlib.contextmanager
def block_by_block(model) -> Iterator[None]:
    """Inside the block, ``model`` steps (and builds states) block by block instead of through the
    one-call plan (``use_fused_step = False``); restored on exit, also after a failure."""
    model.use_fused_step = False
    try:
        yield
    finally:
        model.use_fused_step = True


def stream(model, x: torch.Tensor, state=None, inplace: bool = False):
    """Step through ``x`` one frame at a time; returns ``([B, T, H], final state)``."""
    state = model.init_state(x.shape[0]) if state is None else state
    outs = []
    for t in range(x.shape[1]):
        y, state = model.step(x[:, t], state, inplace=inplace)
        outs.append(y)
    return torch.stack(outs, 1), state


def assert_stream_equals_forward(model, x: torch.Tensor, msg: str = "") -> None:
    """``model`` stepped through ``x`` frame by frame, functional and in place, gives its forward's
    outputs and final state."""
    with torch.no_grad():
        want, want_state = model(x, return_sequence=True, return_state=True)
        for inplace in (True, False):
            got, state = stream(model, x, inplace=inplace)
            assert_close(got, want, msg=f"{msg} inplace={inplace}")
            assert_tree_close(state, want_state, msg=f"{msg} inplace={inplace} state")
