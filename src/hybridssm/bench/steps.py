"""Streaming steps (``benchmarks/bench_step.py``): batch-1 step latency against the machine's bar
(DESIGN §5: reading each weight once), against re-running the window, and many streams at once
against the GEMM ceiling."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hybridssm.ops._kernels import use_kernels

from .machine import matmul_flops, param_bytes
from .tables import cell, markdown_table
from .timing import BenchSettings, time_interleaved, time_rounds

__all__ = ["STREAM_BATCHES", "WINDOW", "StepBench", "attended_cache_bytes", "bench_steps",
           "format_step_table"]

WINDOW = 60  # the seeds' real-time window (frames)
STREAM_BATCHES = (16, 64, 256)


def attended_cache_bytes(state: Any) -> int:
    """Bytes of attention keys and values the next step attends: per attention layer, the filled
    slots (prefix tokens and the new key included), at most the buffer (a full ring when the
    window slides), at the furthest row's position."""
    from hybridssm.mixers.attention import AttentionState

    total, todo = 0, [state]
    while todo:
        node = todo.pop()
        if isinstance(node, AttentionState):
            slots = node.k.shape[2]
            filled = min(int(node.pos.max()) + 1, slots)
            total += sum(t.numel() // slots * filled * t.element_size() for t in (node.k, node.v))
        elif isinstance(node, tuple) and not isinstance(node, Tensor):
            todo.extend(node)
    return total


def _restore(state: Any, saved: Any) -> None:
    for a, b in zip(torch.utils._pytree.tree_leaves(state), torch.utils._pytree.tree_leaves(saved)):
        a.copy_(b)


def _prefilled(model: nn.Module, batch: int, max_len: int | None) -> Any:
    """The state after ``WINDOW`` random frames (the seeds' real-time case: a window of history)."""
    p = next(model.parameters())
    x = torch.randn(batch, WINDOW, model.config.embed_dim, device=p.device, dtype=p.dtype)
    return model(x, return_state=True, max_len=max_len)[1]


@dataclass
class StepBench:
    """What :func:`bench_steps` measures. ``steps`` batch-1 steps per model, in ``rounds``
    interleaved rounds (each round restarts from the prefilled state, so that full attention's
    span stays near ``WINDOW``); the window and stream timings follow ``settings`` (2 warm-ups,
    then until ``max_time`` s or ``max_iters``, medians, models interleaved)."""

    steps: int = 1000
    rounds: int = 5
    warmup: int = 20
    window: bool = True
    batches: tuple[int, ...] = STREAM_BATCHES
    settings: BenchSettings = field(default_factory=BenchSettings)


def _latencies(models: Mapping[str, nn.Module], plan: StepBench) -> dict[str, dict[str, float]]:
    """Median seconds of ``step(x_t, state, inplace=True)`` at batch 1 and the mean attended cache
    bytes over the timed positions, models interleaved round by round."""
    fns, states, cache = {}, {}, {}
    for label, model in models.items():
        state = _prefilled(model, 1, None)  # the default capacity: what a user streams with
        p = next(model.parameters())
        x = torch.randn(1, model.config.embed_dim, device=p.device, dtype=p.dtype)
        fns[label] = lambda m=model, x=x, s=state: m.step(x, s, inplace=True)
        states[label], cache[label] = (state, state.clone()), []

    def start(label: str) -> None:
        _restore(*states[label])
        cache[label].append(attended_cache_bytes(states[label][0]))

    def end(label: str) -> None:
        cache[label].append(attended_cache_bytes(states[label][0]))

    device = next(iter(models.values())).final_norm.weight.device
    steps = time_rounds(fns, plan.steps, rounds=plan.rounds, warmup=plan.warmup, device=device,
                        before_round=start, after_round=end)
    return {k: {"step_s": steps[k], "cache_bytes": statistics.mean(cache[k])} for k in models}


def _streams(models: Mapping[str, nn.Module], batch: int, plan: StepBench) -> dict[str, dict[str, float]]:
    """Frames/s of ``step(x, state, reset=done, inplace=True)`` at ``batch`` streams, a random
    1/``WINDOW`` of rows ending their episode each step, and the matmul FLOPs per frame."""
    s = plan.settings
    cap = WINDOW + s.warmup + s.max_iters + 1  # the most steps a row can take here
    fns, flops = {}, {}
    for label, model in models.items():
        state = _prefilled(model, batch, cap)
        p = next(model.parameters())
        x = torch.randn(batch, model.config.embed_dim, device=p.device, dtype=p.dtype)
        dones = iter(torch.rand(s.warmup + s.max_iters, batch, device=p.device) < 1 / WINDOW)
        fns[label] = lambda m=model, x=x, st=state, d=dones: m.step(x, st, reset=next(d), inplace=True)
        # counted on the PyTorch forms: fused kernels are opaque to the counter, and do the same products
        with use_kernels("torch"):
            flops[label] = matmul_flops(lambda m=model, x=x, st=state: m.step(x, st)) / batch
    times = time_interleaved(fns, s, next(iter(models.values())).final_norm.weight.device)
    return {k: {"fps": batch / times[k], "flops_per_frame": flops[k]} for k in models}


@torch.inference_mode()
def bench_steps(models: Mapping[str, nn.Module], rates: Mapping[str, float],
                plan: StepBench | None = None) -> list[dict[str, Any]]:
    """One row per model (``label -> model``, in eval mode): batch-1 step ms beside its bar
    (parameter bytes + attended cache bytes over ``rates["read_gbs"]``), re-running the
    ``WINDOW``-frame window, and frames/s of many streams with their fraction of the GEMM ceiling
    (matmul FLOPs per frame x frames/s over ``rates["gemm_gflops"]``). Every ratio is computed
    from the measured values in the row."""
    plan = plan or StepBench()
    lat = _latencies(models, plan)
    windows: dict[str, float] = {}
    if plan.window:
        xs = {k: torch.randn(1, WINDOW, m.config.embed_dim, device=m.final_norm.weight.device)
              for k, m in models.items()}
        windows = time_interleaved({k: (lambda m=m, x=xs[k]: m(x)) for k, m in models.items()},
                                   plan.settings, next(iter(xs.values())).device)
    streams = {b: _streams(models, b, plan) for b in plan.batches}
    rows = []
    for label, model in models.items():
        weights = param_bytes(model)
        bar = (weights + lat[label]["cache_bytes"]) / (rates["read_gbs"] * 1e9)
        row: dict[str, Any] = {
            "model": label, "weights_mb": weights / 1e6, "cache_mb": lat[label]["cache_bytes"] / 1e6,
            "bar_ms": bar * 1e3, "step_ms": lat[label]["step_s"] * 1e3,
        }
        row["step_bar"] = row["step_ms"] / row["bar_ms"]
        row["window_ms"] = windows[label] * 1e3 if label in windows else None
        row["window_step"] = None if row["window_ms"] is None else row["window_ms"] / row["step_ms"]
        for b in plan.batches:
            st = streams[b][label]
            row[f"fps_{b}"] = st["fps"]
            row[f"flops_{b}"] = st["flops_per_frame"]
            row[f"gemm_{b}"] = st["flops_per_frame"] * st["fps"] / (rates["gemm_gflops"] * 1e9)
        rows.append(row)
    return rows


def format_step_table(rows: list[dict[str, Any]], batches: tuple[int, ...] = STREAM_BATCHES) -> str:
    """A markdown table of :func:`bench_steps` rows."""
    head = ["model", "weights MB", "bar ms", "step ms (B=1)", "step / bar", f"window ms ({WINDOW} frames)",
            "window / step"] + [f"frames/s B={b} (of GEMM)" for b in batches]
    lines = []
    for r in rows:
        cells = [r["model"], cell(r["weights_mb"], ".1f"), cell(r["bar_ms"], ".3f"),
                 cell(r["step_ms"], ".3f"), cell(r["step_bar"], ".1f", "x"), cell(r["window_ms"], ".2f"),
                 cell(r["window_step"], ".1f", "x")]
        cells += [f"{r[f'fps_{b}']:,.0f} ({r[f'gemm_{b}']:.0%})" for b in batches]
        lines.append(cells)
    return markdown_table(head, lines)
