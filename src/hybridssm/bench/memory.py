"""Peak memory of one forward+backward, each row in its own subprocess (DESIGN §5), in MiB: the
growth of the peak resident set (CPU) or of ``max_memory_allocated`` (CUDA) over one
forward+backward on the whole output sequence, after one untimed forward+backward (lazy
initialisation and kernel builds stay out of it).

A row is rebuilt in the subprocess by a *factory*: ``"module:function"`` or
``"/path/to/file.py:function"``, called with JSON-able arguments, returning a module that takes
``[B, T, E]`` frames (:func:`~hybridssm.bench.timing.workloads`). ``python -m hybridssm.bench
SPEC`` runs one measurement.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["peak_memory", "peak_memory_of", "resolve_factory"]

# glibc raises its mmap threshold after frees and would keep the untimed run's buffers in the
# heap; the measured run would then reuse them and read too low. A fixed threshold prevents that.
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def resolve_factory(target: str) -> Any:
    """The function named by ``"module:function"`` or ``"/path/to/file.py:function"``."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"factory must be 'module:function' or 'file.py:function', got {target!r}")
    if where.endswith(".py"):
        path = Path(where)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"factory {target!r}: cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while a class is built
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0  # pragma: no cover


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:  # pragma: no cover - not Linux, or not permitted
        return False


def measure_child(spec: Mapping[str, Any]) -> dict[str, float]:
    """Runs in the subprocess: build the row, one untimed forward+backward, then the growth of the
    peak memory over one more (MiB)."""
    import resource

    from .timing import input_size, workloads

    for mod in spec.get("imports", []):
        importlib.import_module(mod)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = resolve_factory(spec["factory"])(*spec["args"]).to(device).train()
    B, T = spec["shape"]
    run, _ = workloads(model, torch.randn(B, T, input_size(model), device=device))
    run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        return {"peak_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20}
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        run()
        after = _status_kib("VmHWM")
    else:  # pragma: no cover - ru_maxrss cannot be reset: the untimed run's peak stays in it
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": max(0, after - before) / 1024}


def peak_memory_of(factory: str, args: Sequence[Any], shape: tuple[int, int], *, device: str = "cpu",
                   threads: int | None = None, imports: Sequence[str] | None = None,
                   timeout: float = 600) -> float | None:
    """MiB of extra peak memory of one forward+backward of ``factory(*args)`` at ``shape`` (B, T),
    measured in a fresh subprocess (None when the subprocess fails or runs past ``timeout`` s)."""
    spec = {"factory": factory, "args": list(args), "shape": list(shape), "device": device,
            "threads": threads or torch.get_num_threads(), "imports": list(imports or [])}
    env = {**os.environ, **_CHILD_ENV}
    src = str(Path(__file__).resolve().parents[2])  # this checkout's hybridssm first
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run([sys.executable, "-m", "hybridssm.bench", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env, check=True)
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


def peak_memory(model_name: str, options: Mapping[str, Any], shape: tuple[int, int], *,
                baseline: bool = False, device: str = "cpu", threads: int | None = None,
                imports: Sequence[str] | None = None, timeout: float = 600) -> float | None:
    """:func:`peak_memory_of` a registered model built with ``options`` (or, with ``baseline``,
    of its :class:`~hybridssm.bench.compare.BaselineTransformer`)."""
    return peak_memory_of("hybridssm.bench.compare:build_row", [model_name, dict(options), baseline], shape,
                          device=device, threads=threads, imports=imports, timeout=timeout)
