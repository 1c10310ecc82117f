"""How every benchmark times (DESIGN §5): a fixed thread count (the caller sets and prints it), 2
warm-up iterations, then repeat until ``max_time`` seconds (3) or ``max_iters`` (20) iterations and
report the median; the candidates of one comparison run in one process, interleaved call by call
(or, for many short calls, round by round), so that a change in the machine's load hits them alike.

Times are in seconds here; tables show milliseconds and tokens/s.
"""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from .machine import matmul_flops, sync

__all__ = [
    "BenchSettings",
    "input_size",
    "measure_modules",
    "run_within",
    "step_latency",
    "time_interleaved",
    "time_rounds",
    "timing_line",
    "window_latency",
    "workloads",
]


@dataclass
class BenchSettings:
    """How long to measure. ``warmup`` / ``max_time`` / ``max_iters`` per candidate of a
    throughput comparison; ``latency_steps`` / ``latency_warmup`` per batch-1 step latency;
    ``memory``: measure peak memory (a subprocess per row)."""

    warmup: int = 2
    max_time: float = 3.0
    max_iters: int = 20
    latency_steps: int = 1000
    latency_warmup: int = 20
    memory: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def quick(cls, **overrides: Any) -> BenchSettings:
        """The benchmarks' ``--quick`` smoke test: every code path, few iterations, no peak memory."""
        base = dict(warmup=1, max_time=0.05, max_iters=2, latency_steps=10, latency_warmup=1, memory=False)
        return cls(**{**base, **overrides})


def timing_line(settings: BenchSettings) -> str:
    """The protocol of :func:`measure_modules` with ``settings``, as the tables' header says it (the
    first two warm-ups are always made: the slow-limit check and the FLOP count)."""
    return (f"Timing: {max(2, settings.warmup)} warm-up iterations (the second counts matmul FLOPs), "
            f"then until {settings.max_time} s or {settings.max_iters} iterations, median; the rows of a "
            "table and shape interleaved in one process")


def time_interleaved(fns: Mapping[str, Callable[[], Any]], settings: BenchSettings,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Median seconds per call of each function: ``settings.warmup`` calls each, then one call of
    each in turn until a function has run ``max_time`` seconds or ``max_iters`` times."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(settings.warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    spent = dict.fromkeys(fns, 0.0)
    active = list(fns)
    while active:
        for name in list(active):
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            dt = time.perf_counter() - t0
            times[name].append(dt)
            spent[name] += dt
            if spent[name] >= settings.max_time or len(times[name]) >= settings.max_iters:
                active.remove(name)
    return {k: statistics.median(v) for k, v in times.items()}


def time_rounds(fns: Mapping[str, Callable[[], Any]], calls: int, *, rounds: int = 1, warmup: int = 0,
                device: torch.device | str = "cpu", before_round: Callable[[str], Any] | None = None,
                after_round: Callable[[str], Any] | None = None) -> dict[str, float]:
    """Median seconds per call of many short calls (steps): ``warmup`` calls each, then ``rounds``
    rounds in which each function in turn makes ``calls // rounds`` timed calls (at least one).
    ``before_round(name)`` / ``after_round(name)`` run untimed around each function's share."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            if before_round is not None:
                before_round(name)
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
            if after_round is not None:
                after_round(name)
    return {k: statistics.median(v) for k, v in times.items()}


class _Stopped(Exception):
    pass


def run_within(fn: Callable[[], Any], seconds: float) -> bool:
    """Run ``fn``; False when it was still running after ``seconds`` (then interrupted by SIGALRM,
    which Python delivers between ops: a slow path is a long chain of ops, so it stops within one
    op). Without a limit (``seconds <= 0``) or off the main thread, ``fn`` runs to the end."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        fn()
        return True

    fired = []

    def alarm(signum, frame):
        fired.append(True)
        raise _Stopped

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        fn()
        return True
    except Exception:  # raised inside a Python backward, autograd may re-raise it wrapped
        if fired:
            return False
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- what is timed --------------------------------------------------------------------------------
def _is_sequence_model(m: nn.Module) -> bool:
    # a hybridssm model (streams, returns its last timestep unless asked for the sequence)
    return callable(getattr(m, "init_state", None)) and hasattr(m, "config")


def input_size(m: nn.Module) -> int:
    """The feature size of the frames ``m`` takes: a hybridssm model's ``config.embed_dim``, else
    the module's ``embed_dim`` attribute (the baseline, a benchmark's wrapped reference model)."""
    return m.config.embed_dim if _is_sequence_model(m) else m.embed_dim


def workloads(m: nn.Module, x: Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(forward+backward, forward)`` callables of ``m`` on ``x [B, T, E]``, on the whole output
    sequence (a hybridssm model is called with ``return_sequence=True``; any other module is called
    as ``m(x)`` and returns ``[B, T, H]``). The backward is of the mean square of the output; the
    gradients are dropped after each call; the forward runs without autograd."""

    def out() -> Tensor:
        return m(x, return_sequence=True) if _is_sequence_model(m) else m(x)

    def fwd_bwd() -> None:
        out().float().square().mean().backward()
        for p in m.parameters():
            p.grad = None

    @torch.no_grad()
    def fwd() -> None:
        out()

    return fwd_bwd, fwd


def measure_modules(modules: Mapping[str, nn.Module], x: Tensor, settings: BenchSettings, *,
                    slow_limit: float = 0.0, forward: bool = True, count_flops: bool = True,
                    count_fwd_flops: bool = False) -> dict[str, dict[str, Any]]:
    """Forward+backward (in train mode) and, when ``forward``, forward (in eval mode) of every
    module on ``x [B, T, E]``, interleaved (:func:`time_interleaved`).

    Of the warm-ups, the first is timed against ``slow_limit`` seconds (a forward+backward still
    running then is stopped and left out: ``too_slow``, DESIGN §5's "—"; 0: no limit) and, with
    ``count_flops``, the second counts the matmul FLOPs (of the forward too, in its second warm-up,
    with ``count_fwd_flops``). Per label: ``fwd_bwd_s`` / ``fwd_s``
    (median seconds; None where not run), ``fwd_bwd_tok_s`` / ``fwd_tok_s`` (tokens/s), ``flops``
    / ``fwd_flops`` (matmul FLOPs of one call), ``first_s`` (the first forward+backward, seconds)
    and ``too_slow``."""
    B, T = x.shape[:2]
    device = x.device
    out: dict[str, dict[str, Any]] = {}
    fb_fns, fw_fns = {}, {}
    for label, m in modules.items():
        m.train()
        fb, fw = workloads(m, x)
        t0 = time.perf_counter()
        ok = run_within(fb, slow_limit)
        sync(device)
        out[label] = {"first_s": time.perf_counter() - t0, "too_slow": not ok, "flops": None,
                      "fwd_flops": None, "fwd_bwd_s": None, "fwd_s": None}
        if ok:
            if count_flops:
                out[label]["flops"] = matmul_flops(fb)
            fb_fns[label], fw_fns[label] = fb, fw
        else:
            for p in m.parameters():
                p.grad = None
    done = 1 + count_flops  # warm-ups already made
    rest = replace(settings, warmup=max(0, settings.warmup - done))
    for label, t in time_interleaved(fb_fns, rest, device).items():
        out[label]["fwd_bwd_s"] = t
    if forward:
        for label in fw_fns:
            modules[label].eval()
            fw_fns[label]()
            if count_fwd_flops:
                out[label]["fwd_flops"] = matmul_flops(fw_fns[label])
        fw_rest = replace(settings, warmup=max(0, settings.warmup - 1 - count_fwd_flops))
        for label, t in time_interleaved(fw_fns, fw_rest, device).items():
            out[label]["fwd_s"] = t
    for res in out.values():
        res["fwd_bwd_tok_s"] = B * T / res["fwd_bwd_s"] if res["fwd_bwd_s"] else None
        res["fwd_tok_s"] = B * T / res["fwd_s"] if res["fwd_s"] else None
    return out


# -- batch-1 latency --------------------------------------------------------------------------------
@torch.no_grad()
def step_latency(model: nn.Module, settings: BenchSettings) -> float:
    """Median seconds of ``model.step(x_t, state, inplace=True)`` at batch 1 (``latency_warmup``
    steps, then ``latency_steps`` timed)."""
    p = next(model.parameters())
    state = model.init_state(1)
    x = torch.randn(1, input_size(model), device=p.device, dtype=p.dtype)
    fns = {"step": lambda: model.step(x, state, inplace=True)}
    return time_rounds(fns, settings.latency_steps, warmup=settings.latency_warmup, device=p.device)["step"]


@torch.no_grad()
def window_latency(model: nn.Module, window: int, settings: BenchSettings) -> float:
    """Median seconds of re-running the last ``window`` frames at batch 1 (no state; the seeds'
    alternative to a step): ``latency_steps / 10`` calls (5 to 200) after ``latency_warmup``."""
    p = next(model.parameters())
    x = torch.randn(1, window, input_size(model), device=p.device, dtype=p.dtype)
    calls = max(5, min(settings.latency_steps // 10, 200))
    fns = {"window": lambda: model(x)}
    return time_rounds(fns, calls, warmup=settings.latency_warmup, device=p.device)["window"]
