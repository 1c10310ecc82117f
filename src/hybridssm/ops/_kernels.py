"""Backend selection for every op, in one place.

Each op in ``ops/`` registers its implementations here under one name:

* ``ref``   - the plain loop over time, obviously right (the oracle in tests);
* ``torch`` - the fast pure-PyTorch form (chunked / parallel), always available;
* ``fused`` - an optional compiled kernel (C++ through ``torch.utils.cpp_extension``, later Triton
  or CUDA), registered with an ``available()`` probe that builds it on first use.

The backend comes from, in order: ``use_kernels(...)`` blocks, the ``HYBRIDSSM_KERNELS``
environment variable (``auto|fused|torch|ref``), then ``auto``. ``auto`` picks ``fused`` when it is
available for the op and the input's device, else ``torch``; a failed build warns once and falls back.
Modules never test for kernels themselves: they call the op, and the op calls :func:`get`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["BACKENDS", "register", "get", "kernels", "use_kernels", "current_backend"]

BACKENDS = ("auto", "fused", "torch", "ref")


@dataclass
class _Op:
    impls: dict[str, Callable] = field(default_factory=dict)
    # fused availability probe: device type -> (ok, reason); called once per device type
    fused_probe: Callable[[str], tuple[bool, str]] | None = None
    fused_status: dict[str, tuple[bool, str]] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}
_FORCED: list[str] = []
# Read once at import so that compiled graphs see a constant (set the variable before importing).
_ENV_BACKEND = os.environ.get("HYBRIDSSM_KERNELS", "auto")


def _validate_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def current_backend() -> str:
    """The requested backend: the innermost ``use_kernels`` block, else the environment."""
    if _FORCED:
        return _FORCED[-1]
    return _validate_backend(_ENV_BACKEND, "HYBRIDSSM_KERNELS")


@contextlib.contextmanager
def use_kernels(backend: str) -> Iterator[None]:
    """Force a backend (``auto``, ``fused``, ``torch`` or ``ref``) inside a ``with`` block."""
    _FORCED.append(_validate_backend(backend, "use_kernels(backend)"))
    try:
        yield
    finally:
        _FORCED.pop()


def register(
    op: str,
    *,
    ref: Callable,
    torch_impl: Callable,
    fused: Callable | None = None,
    fused_probe: Callable[[str], tuple[bool, str]] | None = None,
) -> None:
    """Register an op's implementations (called once at import of the op's module)."""
    impls = {"ref": ref, "torch": torch_impl}
    if fused is not None:
        impls["fused"] = fused
    _OPS[op] = _Op(impls=impls, fused_probe=fused_probe)


def _fused_ok(entry: _Op, device_type: str) -> tuple[bool, str]:
    if "fused" not in entry.impls:
        return False, "no fused kernel for this op"
    if device_type not in entry.fused_status:
        if entry.fused_probe is None:
            entry.fused_status[device_type] = (True, "fused kernel")
        else:
            try:
                entry.fused_status[device_type] = entry.fused_probe(device_type)
            except Exception as exc:  # a build failure must never break the model
                entry.fused_status[device_type] = (False, f"build failed: {exc}")
    return entry.fused_status[device_type]


_WARNED: set[str] = set()


def resolve(op: str, device_type: str = "cpu") -> tuple[str, str]:
    """The backend ``op`` would use on ``device_type`` now, and why."""
    entry = _OPS[op]
    want = current_backend()
    if want in ("ref", "torch"):
        return want, "forced" if _FORCED or _ENV_BACKEND != "auto" else "default"
    if torch.compiler.is_exporting():
        # an exported program must run without this package (AOTInductor, ONNX): no custom ops
        return "torch", "exporting"
    ok, reason = _fused_ok(entry, device_type)
    if want == "fused":
        if not ok:
            raise RuntimeError(f"fused kernel for {op!r} on {device_type} unavailable: {reason}")
        return "fused", reason
    if ok:
        return "fused", reason
    if reason.startswith("build failed") and op not in _WARNED:
        _WARNED.add(op)
        warnings.warn(f"hybridssm: {op}: {reason}; using the PyTorch form", stacklevel=3)
    return "torch", reason


def get(op: str, device: torch.device | str = "cpu") -> Callable:
    """The implementation of ``op`` to call for tensors on ``device``."""
    device_type = torch.device(device).type
    backend, _ = resolve(op, device_type)
    return _OPS[op].impls[backend]


def kernels(device: torch.device | str = "cpu") -> dict[str, dict[str, str]]:
    """Which backend each registered op uses on ``device``, and why."""
    device_type = torch.device(device).type
    out = {}
    for op in sorted(_OPS):
        backend, reason = resolve(op, device_type)
        out[op] = {"backend": backend, "reason": reason, "available": ", ".join(_OPS[op].impls)}
    return out
