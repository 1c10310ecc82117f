"""Build (once, cached) the fused CPU kernels in ``ops/csrc`` with ``torch.utils.cpp_extension``.

The build defines ``CPU_CAPABILITY`` from :func:`torch.backends.cpu.get_cpu_capability`: without it
``at::vec::Vectorized`` silently compiles to its generic scalar code (REFERENCES, Mamba-1 speed).
The extension name carries the capability and a hash of the source and of the shared headers in
``csrc``, so machines with different SIMD, and different versions of the library, never share (or
race on) a build.
Builds go to torch's extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["load_extension", "cpu_capability_flags", "kernel_probe"]

CSRC = Path(__file__).parent / "csrc"


def cpu_capability_flags() -> tuple[str, list[str]]:
    """``(capability, compiler flags)`` for the SIMD level torch itself dispatches to here."""
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if cap == "AVX512":
        return cap, ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
                     "-mavx512vl", "-mavx512dq", "-mfma"]
    if cap == "AVX2":
        return cap, ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]


def load_extension(source: str) -> ModuleType:
    """Compile ``csrc/<source>.cpp`` for this CPU (first call per process; later runs hit the cache).

    A failed build is remembered: every later call in the process raises the same error at once."""
    result = _load(source)
    if isinstance(result, BaseException):
        raise result
    return result


@functools.cache
def _load(source: str) -> ModuleType | Exception:
    import hashlib

    from torch.utils.cpp_extension import load

    cap, flags = cpu_capability_flags()
    path = CSRC / f"{source}.cpp"
    h = hashlib.sha256(path.read_bytes())
    for header in sorted(CSRC.rglob("*.h")):
        h.update(header.read_bytes())
    digest = h.hexdigest()[:10]
    try:
        return load(
            name=f"hybridssm_{source}_{cap.lower()}_{digest}",
            sources=[str(path)],
            extra_cflags=["-O3", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # reported by the kernel probes, which fall back to the PyTorch form
        return exc


def kernel_probe(source: str, what: str) -> Callable[[str], tuple[bool, str]]:
    """A ``fused_probe`` for :func:`hybridssm.ops._kernels.register`: CPU only, builds
    ``csrc/<source>.cpp`` on first use (a failed build raises, and the dispatcher falls back).

    The probe runs for real, not traced, when an op's first call happens inside ``torch.compile``:
    its result is a constant of the process, and dynamo cannot trace a build."""

    @torch.compiler.assume_constant_result
    def probe(device_type: str) -> tuple[bool, str]:
        if device_type != "cpu":
            return False, f"the fused {what} runs on CPU only"
        load_extension(source)
        return True, f"fused C++ kernel ({cpu_capability_flags()[0]})"

    return probe
