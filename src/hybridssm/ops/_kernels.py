"""Backend selection for every op, in one place.

Each op in ``ops/`` registers its implementations here under one name:

* ``ref``   - the plain loop over time, obviously right (the oracle in tests);
* ``torch`` - the fast pure-PyTorch form (chunked / parallel), always available;
* ``fused`` - an optional compiled kernel (C++ through ``torch.utils.cpp_extension``, later Triton
  or CUDA), registered with an ``available()`` probe that builds it on first use.

The backend comes from, in order: ``use_kernels(...)`` blocks (per thread), the ``HYBRIDSSM_KERNELS``
environment variable (``auto|fused|torch|ref``, read at import; another value warns at import and
every op raises the same message), then ``auto``. ``auto`` picks
``fused`` when it is available for the op and the input's device, else ``torch``. Under
``torch.export`` both ``auto`` and ``fused`` trace the ``torch`` forms (an exported program must not
need this library's kernels).
A failed build gives one warning in the whole process, whichever ops it hits, and those ops fall
back to ``torch``. :func:`kernels` reports all this without building anything, also for the kernels
whose caller picks the form itself (:func:`register_listed`: the streaming step).
Modules never test for kernels themselves: they call the op, and the op calls :func:`get`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["BACKENDS", "register", "register_listed", "get", "kernels", "use_kernels", "current_backend"]

BACKENDS = ("auto", "fused", "torch", "ref")


@dataclass
class _Op:
    impls: dict[str, Callable] = field(default_factory=dict)
    # the forms the op has (ref, torch, fused): the keys of ``impls``, or a listed kernel's forms
    forms: tuple[str, ...] = ()
    # fused availability probe: device type -> (ok, reason); called once per device type
    fused_probe: Callable[[str], tuple[bool, str]] | None = None
    fused_status: dict[str, tuple[bool, str]] = field(default_factory=dict)


_OPS: dict[str, _Op] = {}
_LOCAL = threading.local()  # .forced: this thread's stack of use_kernels blocks
# How many use_kernels blocks are open in all threads together: while none is, every thread's backend
# is the environment's, which a caller that remembered a choice (the model step's fast path) may keep
# without reading this thread's stack. A list, read without a call; written under the lock.
FORCED_BLOCKS = [0]
_FORCED_LOCK = threading.Lock()
# Read once at import so that compiled graphs see a constant (set the variable before importing).
_ENV_BACKEND = os.environ.get("HYBRIDSSM_KERNELS", "auto")


def _backend_message(name: str, source: str) -> str:
    return f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}"


def _validate_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(_backend_message(name, source))
    return name


if _ENV_BACKEND not in BACKENDS:
    # Said at import, where the variable is read: every op (and kernels()) raises this until then.
    # A warning, not an error: what needs no op (configs, the registry, the CLI's listings) still works.
    warnings.warn(f"hybridssm: {_backend_message(_ENV_BACKEND, 'HYBRIDSSM_KERNELS')}; every op will raise "
                  "this error until the variable is fixed or unset", UserWarning, stacklevel=1)


def _forced() -> list[str] | tuple[()]:
    # Only read here: ops call this inside torch.compile traces, which must not write thread state.
    return getattr(_LOCAL, "forced", ())


def current_backend() -> str:
    """The requested backend: this thread's innermost ``use_kernels`` block, else the environment."""
    forced = _forced()
    if forced:
        return forced[-1]
    return _validate_backend(_ENV_BACKEND, "HYBRIDSSM_KERNELS")


@contextlib.contextmanager
def use_kernels(backend: str) -> Iterator[None]:
    """Force a backend (``auto``, ``fused``, ``torch`` or ``ref``) inside a ``with`` block.

    The choice belongs to the calling thread: other threads keep their own backend meanwhile. A
    graph compiled by ``torch.compile`` keeps the backend it was traced with."""
    forced = getattr(_LOCAL, "forced", None)
    if forced is None:
        forced = _LOCAL.forced = []
    forced.append(_validate_backend(backend, "use_kernels(backend)"))
    with _FORCED_LOCK:
        FORCED_BLOCKS[0] += 1
    try:
        yield
    finally:
        forced.pop()
        with _FORCED_LOCK:
            FORCED_BLOCKS[0] -= 1


def register(
    op: str,
    *,
    ref: Callable,
    torch_impl: Callable,
    fused: Callable | None = None,
    fused_probe: Callable[[str], tuple[bool, str]] | None = None,
) -> None:
    """Register an op's implementations (called once at import of the op's module).

    ``fused_probe(device_type) -> (ok, reason)`` makes the fused kernel available (building it if
    needed) or raises; it runs once per device type. A probe with a ``peek`` attribute (same
    signature, ``ok`` may be ``None`` for "not known yet") is what :func:`kernels` asks instead: it
    must not build. A probe without one must be cheap."""
    impls = {"ref": ref, "torch": torch_impl}
    if fused is not None:
        impls["fused"] = fused
    _OPS[op] = _Op(impls=impls, forms=tuple(impls), fused_probe=fused_probe)


def register_listed(
    op: str, *, forms: tuple[str, ...], fused_probe: Callable[[str], tuple[bool, str]]
) -> None:
    """List in :func:`kernels` a fused kernel that its caller selects itself instead of through
    :func:`get` (the streaming step: one C++ call per model step, else the blocks one by one, each
    through its own ops). ``forms`` are the backends it honours (``ref``, ``torch``, ``fused``);
    ``fused_probe`` is as in :func:`register` (with a ``peek``, so that the report builds nothing)."""
    _OPS[op] = _Op(forms=tuple(forms), fused_probe=fused_probe)


def _fused_ok(entry: _Op, device_type: str) -> tuple[bool, str]:
    if "fused" not in entry.forms:
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


def _fused_status(op: str, device_type: str) -> tuple[bool, str]:
    """:func:`_fused_ok` by name, a constant to a compiled caller: ``torch.compile`` runs it while
    tracing and guards on nothing, so the status it caches on the first call does not make a
    compiled step recompile on its second frame (the status never changes once known)."""
    return _fused_ok(_OPS[op], device_type)


# What torch.compiler.assume_constant_result(fn) does, without importing the compiler stack at
# `import hybridssm` (test_import.py; tests/ops/test_kernels.py checks that torch's marker is this).
_CONSTANT_MARK = "_dynamo_marked_constant"
setattr(_fused_status, _CONSTANT_MARK, True)


# Non-empty once the process has warned about a failed build: one warning in all, not one per op.
_WARNED: set[str] = set()


def _warn_fallback(op: str, reason: str) -> None:
    if reason.startswith("build failed") and not _WARNED:
        _WARNED.add(op)
        warnings.warn(
            f"hybridssm: {op}: {reason}. Using the PyTorch forms of the fused kernels (same results, "
            "slower); set HYBRIDSSM_KERNELS=torch to skip the build and this warning.",
            stacklevel=4,
        )


def _requested(device_type: str) -> tuple[str, str] | None:
    """The backend when no probe is needed: ``ref`` / ``torch`` asked for, or an export trace."""
    want = current_backend()
    if want in ("ref", "torch"):
        return want, "forced" if _forced() or _ENV_BACKEND != "auto" else "default"
    if torch.compiler.is_exporting():
        return "torch", "torch.export traces the PyTorch forms (a program must not need the fused kernels)"
    return None


def resolve(op: str, device_type: str = "cpu") -> tuple[str, str]:
    """The backend ``op`` would use on ``device_type`` now, and why (builds a fused kernel if needed)."""
    fixed = _requested(device_type)
    if fixed is not None:
        return fixed
    ok, reason = _fused_status(op, device_type)
    if current_backend() == "fused":
        if not ok:
            raise RuntimeError(f"fused kernel for {op!r} on {device_type} unavailable: {reason}")
        return "fused", reason
    if ok:
        return "fused", reason
    _warn_fallback(op, reason)
    return "torch", reason


def get(op: str, device: torch.device | str = "cpu") -> Callable:
    """The implementation of ``op`` to call for tensors on ``device``."""
    device_type = torch.device(device).type
    backend, _ = resolve(op, device_type)
    impl = _OPS[op].impls.get(backend)
    if impl is None:
        raise RuntimeError(f"{op!r} is listed only (register_listed): its caller selects its form itself")
    return impl


def _report(op: str, device_type: str) -> tuple[str, str]:
    """:func:`resolve` without building: a kernel not loaded yet is reported as what ``auto`` will try."""
    entry = _OPS[op]
    fixed = _requested(device_type)
    if fixed is not None:
        return fixed
    if "fused" not in entry.forms or device_type in entry.fused_status or entry.fused_probe is None:
        ok, reason = _fused_ok(entry, device_type)  # known already, or nothing to build
    elif hasattr(entry.fused_probe, "peek"):
        ok, reason = entry.fused_probe.peek(device_type)
    else:  # a plain probe (tests, user registrations) promises to be cheap
        ok, reason = _fused_ok(entry, device_type)
    if ok is False:
        return ("unavailable" if current_backend() == "fused" else "torch"), reason
    return "fused", reason


def kernels(device: torch.device | str = "cpu", *, build: bool = False) -> dict[str, dict[str, str]]:
    """Which backend each registered op uses on ``device``, and why. Builds nothing unless ``build``
    (a kernel not built yet says so, and builds at the op's first call); ``build=True`` builds or
    loads every selected kernel now, e.g. before timing anything."""
    device_type = torch.device(device).type
    out = {}
    for op in sorted(_OPS):
        backend, reason = (resolve if build else _report)(op, device_type)
        out[op] = {"backend": backend, "reason": reason, "available": ", ".join(_OPS[op].forms)}
    return out
