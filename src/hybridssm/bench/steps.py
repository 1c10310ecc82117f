"""Streaming steps (``benchmarks/bench_step.py``): batch-1 step latency against the machine's bar
(DESIGN §5: reading each weight once, at the read rate timed in the same rounds as the steps),
against re-running the window (timed in those rounds too), and many streams at once against the
ceilings the rates measured in the run imply:

* of GEMM: the step's matmul FLOPs over the 512^3 GEMM rate, measured interleaved with the streams
  (between the models' steps, each turn one call that brings the operands back into the caches and
  one timed call, median): on a shared machine the rate moves by a third within minutes, and a rate
  measured once before the rows would move every fraction with it;
* of machine: the ideal time, matmul FLOPs over the GEMM rate + transcendental elements over the
  ``exp`` rate in cache (:data:`~hybridssm.bench.work.TRANSCENDENTALS` says which ops count and how
  many exps each costs) + the bytes a step must move beyond the caches over the read rate: each
  recurrent state read and written once, the attended attention cache read once
  (:func:`stream_bytes`). Weights are left out: read once per step, they are amortised over the batch
  (B = 64 streams of a 6 MB model: 0.1 MB per frame). The read rate is the memory's (a 128 MiB
  buffer, the faster of ``sum``'s one stream and the steps' own four-stream GEMV over it): states
  that fit in the L3 together (Mamba's 2 layers at B = 64: 5 MB) can move faster, so there the
  memory part is an upper bound and the fraction can pass 100%. The three rates are
  timed in the same turns between the streams' steps as the GEMM's (a rate measured once, in a slow
  minute, made the fraction pass 100% on its own);
* of own-shape GEMM: the step's matrix products, each timed alone and hot at its own shape (M = B),
  give the GEMM rate this model's products reach here (thin products such as K = 16 dt projections
  run far below the 512^3 rate); the fraction is their time over the step's. The attention's
  products are among them as the PyTorch form makes them (scores and weighted sums, one row of
  queries per stream): a fused step that computes those without a GEMM call can beat their rate,
  so this fraction can pass 100%.

FLOPs, transcendentals and products are counted on the PyTorch forms of the step, without the
resets (those are in the measured time, not in the ideal)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hybridssm.ops._kernels import use_kernels

from .machine import EXP_ELEMENTS, READ_MIB, gemv_reader, param_bytes, products_rate, sync
from .tables import MISSING, cell, markdown_table, percent
from .timing import BenchSettings, time_interleaved
from .work import count_work

__all__ = ["STREAM_BATCHES", "WINDOW", "StepBench", "attended_cache_bytes", "bench_steps",
           "format_ceiling_table", "format_step_table", "stream_bytes"]

WINDOW = 60  # the seeds' real-time window (frames)
STREAM_BATCHES = (16, 64, 256)
_MACHINE = object()  # the machine's rates' entry among the streams' timed functions (no label can equal it)


def _state_nodes(state: Any) -> tuple[list[Any], list[Tensor]]:
    """The attention states (``AttentionState``) in ``state`` and every other tensor in it."""
    from hybridssm.mixers.attention import AttentionState

    attention, other, todo = [], [], [state]
    while todo:
        node = todo.pop()
        if isinstance(node, AttentionState):
            attention.append(node)
        elif isinstance(node, Tensor):
            other.append(node)
        elif isinstance(node, tuple):
            todo.extend(node)
    return attention, other


def attended_cache_bytes(state: Any) -> int:
    """Bytes of attention keys and values the next step attends: per attention layer and row, the
    filled slots at the row's position (prefix tokens and the new key included), at most the buffer
    (a full ring when the window slides)."""
    total = 0
    for node in _state_nodes(state)[0]:
        batch, slots = node.k.shape[0], node.k.shape[2]
        filled = int((node.pos + 1).clamp(max=slots).sum())
        total += sum(t.numel() // (batch * slots) * filled * t.element_size() for t in (node.k, node.v))
    return total


def stream_bytes(state: Any) -> int:
    """Bytes a step of ``state``'s streams must move beyond the caches: every recurrent state
    tensor (conv windows, SSM and delta-rule states, positions) read and written once, and the
    attention cache the step attends read once (:func:`attended_cache_bytes`)."""
    recurrent = sum(t.numel() * t.element_size() for t in _state_nodes(state)[1])
    return 2 * recurrent + attended_cache_bytes(state)


class _MachineTurns:
    """The machine's rates timed between the streams' steps, one turn per round of steps: the
    ``size``^3 fp32 GEMM and ``exp`` of :data:`EXP_ELEMENTS` values (each one untimed call that
    brings its operands back into the caches, then one timed: hot), and on CPU two reads of
    :data:`READ_MIB` MiB (larger than the caches: one timed call each; :meth:`read`), whose faster
    is the read rate. ``exp`` and the read run on one
    thread, as :func:`~hybridssm.bench.exp_rate` and :func:`~hybridssm.bench.read_rate` time them (exp
    times the threads). :meth:`rates` gives the medians in the units of ``machine_rates``."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.device = device
        self.a, self.c = torch.randn(size, size, device=device), torch.empty(size, size, device=device)
        self.v = torch.randn(EXP_ELEMENTS, device=device)
        self.e = torch.empty_like(self.v)
        self.buf = torch.ones(READ_MIB * 2**20 // 4) if device.type == "cpu" else None
        self.gemv = None if self.buf is None else gemv_reader(self.buf)
        self.threads = torch.get_num_threads()
        self.times: dict[str, list[float]] = {"gemm": [], "exp": [], "read": [], "gemv_read": []}

    def _timed(self, key: str, fn: Any, warm: bool = True) -> None:
        if warm:
            fn()
            sync(self.device)
        t0 = time.perf_counter()
        fn()
        sync(self.device)
        self.times[key].append(time.perf_counter() - t0)

    def __call__(self) -> None:
        self._timed("gemm", lambda: torch.mm(self.a, self.a, out=self.c))
        torch.set_num_threads(1)
        try:
            self._timed("exp", lambda: torch.exp(self.v, out=self.e))
        finally:
            torch.set_num_threads(self.threads)
        self.read()

    def read(self) -> None:
        """The read turn alone (on CPU; nothing elsewhere): the buffer's ``sum`` (one stream) and,
        where the step's kernels are built, the steps' own GEMV over it (:func:`gemv_reader`: four
        streams), each one timed call on one thread. The batch-1 steps' bar is a read."""
        if self.buf is None:
            return
        torch.set_num_threads(1)
        try:
            self._timed("read", self.buf.sum, warm=False)
            if self.gemv is not None:
                self._timed("gemv_read", self.gemv, warm=False)
        finally:
            torch.set_num_threads(self.threads)

    def rates(self) -> dict[str, float]:
        """The medians of the turns taken (a rate whose turn never ran is left out)."""
        t = {k: statistics.median(v) for k, v in self.times.items() if v}
        out = {}
        if "gemm" in t:
            out["gemm_gflops"] = 2 * self.a.shape[0] ** 3 / t["gemm"] / 1e9
        if "exp" in t:
            out["exp_gelems"] = self.threads * self.v.numel() / t["exp"] / 1e9
        if "read" in t:
            # the faster of the two reads: the single-thread read rate a step can reach here
            out["sum_read_gbs"] = self.buf.numel() * 4 / t["read"] / 1e9
            out["read_gbs"] = out["sum_read_gbs"]
            if "gemv_read" in t:
                out["gemv_read_gbs"] = self.buf.numel() * 4 / t["gemv_read"] / 1e9
                out["read_gbs"] = max(out["read_gbs"], out["gemv_read_gbs"])
        return out


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
    span stays near ``WINDOW``), the window's calls spread over the same rounds (``settings``:
    its warm-ups, then up to ``max_iters`` calls or ``max_time`` s in all); the stream timings
    follow ``settings`` (warm-ups, then until ``max_time`` s or ``max_iters``, medians, models
    interleaved); ``gemm_seconds`` per
    distinct matrix product of the streams' steps, timed alone for the own-shape GEMM rate (a shape
    that several models or batches share is timed once); ``gemm_size`` the square fp32 GEMM timed
    between the streams' steps for the GEMM ceiling (512: the rate :func:`machine_rates` reports)."""

    steps: int = 1000
    rounds: int = 5
    warmup: int = 20
    window: bool = True
    batches: tuple[int, ...] = STREAM_BATCHES
    settings: BenchSettings = field(default_factory=BenchSettings)
    gemm_seconds: float = 0.1
    gemm_size: int = 512


def _batch_one(models: Mapping[str, nn.Module], plan: StepBench) -> tuple[dict[str, dict[str, float]],
                                                                        dict[str, float]]:
    """Per model: the median seconds of ``step(x_t, state, inplace=True)`` at batch 1 (``step_s``),
    of re-running the ``WINDOW``-frame window (``window_s``, where ``plan.window``) and the mean
    attended cache bytes over the timed positions; and the read rate (``read_gbs``, on CPU). All
    three are timed in the same rounds: in each, each model in turn restarts from its prefilled
    state, one read of :data:`READ_MIB` MiB is timed, then its share of the steps, then its share of
    the window calls. The step's bar (a read) and its window (GEMM-bound) are then measured in the
    same minutes as the step they are compared with: this machine's memory and GEMM rates each move
    by up to 2x between minutes, and not together."""
    s = plan.settings
    device = next(iter(models.values())).final_norm.weight.device
    rounds = max(1, plan.rounds)
    per_round = max(1, plan.steps // rounds)
    window_calls = -(-s.max_iters // rounds) if plan.window else 0  # ceil: max_iters in all
    window_time = s.max_time / rounds  # a round's share of the window's time budget
    runs = {}
    for label, model in models.items():
        state = _prefilled(model, 1, None)  # the default capacity: what a user streams with
        p = next(model.parameters())
        x = torch.randn(1, model.config.embed_dim, device=p.device, dtype=p.dtype)
        xs = torch.randn(1, WINDOW, model.config.embed_dim, device=p.device, dtype=p.dtype)
        runs[label] = (lambda m=model, x=x, st=state: m.step(x, st, inplace=True),
                       lambda m=model, x=xs: m(x), state, state.clone())
    turns = _MachineTurns(plan.gemm_size, device)
    times = {k: {"step": [], "window": []} for k in models}
    cache: dict[str, list[int]] = {k: [] for k in models}

    def timed(fn: Any, into: list[float]) -> float:
        t0 = time.perf_counter()
        fn()
        sync(device)
        into.append(time.perf_counter() - t0)
        return into[-1]

    for step, window, _, _ in runs.values():
        for _ in range(plan.warmup):
            step()
        for _ in range(s.warmup if plan.window else 0):
            window()
    sync(device)
    for _ in range(rounds):
        for label, (step, window, state, saved) in runs.items():
            _restore(state, saved)
            cache[label].append(attended_cache_bytes(state))
            turns.read()
            for _ in range(per_round):
                timed(step, times[label]["step"])
            cache[label].append(attended_cache_bytes(state))
            spent = 0.0
            for _ in range(window_calls):
                spent += timed(window, times[label]["window"])
                if spent >= window_time:
                    break
    out = {}
    for label in models:
        t = times[label]
        out[label] = {"step_s": statistics.median(t["step"]), "cache_bytes": statistics.mean(cache[label])}
        if t["window"]:
            out[label]["window_s"] = statistics.median(t["window"])
    return out, turns.rates()


def _streams(models: Mapping[str, nn.Module], batch: int, plan: StepBench,
             products: dict[Any, tuple[float, float]]) -> tuple[dict[str, dict[str, float | None]],
                                                               dict[str, float]]:
    """Frames/s of ``step(x, state, reset=done, inplace=True)`` at ``batch`` streams, a random
    1/``WINDOW`` of rows ending their episode each step; per frame, the matmul FLOPs, transcendental
    elements and bytes moved (the mean of before and after the timed steps); and the GEMM rate of
    the step's own products (``products``: the shapes timed so far in this run). Also the machine's
    rates timed between the models' steps (:class:`_MachineTurns`: the ``plan.gemm_size``^3 GEMM,
    exp and, on CPU, the read rate; medians)."""
    s = plan.settings
    cap = WINDOW + s.warmup + s.max_iters + 1  # the most steps a row can take here
    fns, states, out = {}, {}, {}
    for label, model in models.items():
        state = states[label] = _prefilled(model, batch, cap)
        p = next(model.parameters())
        x = torch.randn(batch, model.config.embed_dim, device=p.device, dtype=p.dtype)
        dones = iter(torch.rand(s.warmup + s.max_iters, batch, device=p.device) < 1 / WINDOW)
        fns[label] = lambda m=model, x=x, st=state, d=dones: m.step(x, st, reset=next(d), inplace=True)
        # counted on the PyTorch forms: fused kernels are opaque to the counters, and do the same work
        with use_kernels("torch"):
            work = count_work(lambda m=model, x=x, st=state: m.step(x, st))
        out[label] = {"flops_per_frame": work.flops / batch, "trans_per_frame": work.transcendentals / batch,
                      "bytes_per_frame": stream_bytes(state) / batch, "products": work.products}
    device = next(iter(models.values())).final_norm.weight.device
    turns = fns[_MACHINE] = _MachineTurns(plan.gemm_size, device)
    times = time_interleaved(fns, s, device)
    for label, st in out.items():
        st["fps"] = batch / times[label]
        st["bytes_per_frame"] = (st["bytes_per_frame"] + stream_bytes(states[label]) / batch) / 2
        st["own_gflops"] = products_rate(st.pop("products"), plan.gemm_seconds, device, products)
    return out, turns.rates()


@torch.inference_mode()
def bench_steps(models: Mapping[str, nn.Module], rates: Mapping[str, float],
                plan: StepBench | None = None) -> list[dict[str, Any]]:
    """One row per model (``label -> model``, in eval mode): batch-1 step ms beside its bar
    (parameter bytes + attended cache bytes over the read rate ``read_gbs_1``) and re-running the
    ``WINDOW``-frame window, the three timed in the same rounds (:func:`_batch_one`); and frames/s
    of many streams with their fraction of the GEMM ceiling (matmul FLOPs per frame x frames/s over
    ``gemm_gflops_B``, the GEMM rate measured between the streams' steps at that batch), of the
    machine's (the ideal time over the measured one; its parts ``ideal_gemm_s_B``,
    ``ideal_exp_s_B``, ``ideal_mem_s_B`` per frame, from ``gemm_gflops_B``, ``exp_gelems_B`` and
    ``read_gbs_B``, the rates timed between the streams' steps) and of the own-shape GEMM rate
    (``own_gflops_B``; see the module docstring). ``rates`` (measured once, before) gives the read
    rates where none is timed (off CPU); the header of a table states its rates beside the
    interleaved ones. Every ratio is computed from the measured values in the row."""
    plan = plan or StepBench()
    lat, one = _batch_one(models, plan)
    read_one = one.get("read_gbs", rates["read_gbs"])  # timed in the batch-1 rounds (on CPU)
    reads = {f"{k}_1": one[k] for k in ("sum_read_gbs", "gemv_read_gbs") if k in one}
    products: dict[Any, tuple[float, float]] = {}  # a shape shared by models or batches is timed once
    streams, machine = {}, {}
    for b in plan.batches:
        streams[b], machine[b] = _streams(models, b, plan, products)
    rows = []
    for label, model in models.items():
        weights = param_bytes(model)
        bar = (weights + lat[label]["cache_bytes"]) / (read_one * 1e9)
        row: dict[str, Any] = {
            "model": label, "weights_mb": weights / 1e6, "cache_mb": lat[label]["cache_bytes"] / 1e6,
            "read_gbs_1": read_one, **reads, "bar_ms": bar * 1e3, "step_ms": lat[label]["step_s"] * 1e3,
        }
        row["step_bar"] = row["step_ms"] / row["bar_ms"]
        row["window_ms"] = lat[label]["window_s"] * 1e3 if "window_s" in lat[label] else None
        row["window_step"] = None if row["window_ms"] is None else row["window_ms"] / row["step_ms"]
        for b in plan.batches:
            st = streams[b][label]
            row[f"fps_{b}"] = st["fps"]
            row[f"flops_{b}"] = st["flops_per_frame"]
            rate = {**rates, **machine[b]}  # timed between the steps; the up-front read rate off CPU
            gemm = rate["gemm_gflops"]
            row[f"gemm_gflops_{b}"] = gemm
            row[f"exp_gelems_{b}"], row[f"read_gbs_{b}"] = rate["exp_gelems"], rate["read_gbs"]
            row[f"gemm_{b}"] = st["flops_per_frame"] * st["fps"] / (gemm * 1e9)
            row[f"trans_{b}"] = st["trans_per_frame"]
            row[f"bytes_{b}"] = st["bytes_per_frame"]
            parts = {"gemm": st["flops_per_frame"] / (gemm * 1e9),
                     "exp": st["trans_per_frame"] / (rate["exp_gelems"] * 1e9),
                     "mem": st["bytes_per_frame"] / (rate["read_gbs"] * 1e9)}
            row.update({f"ideal_{k}_s_{b}": v for k, v in parts.items()})
            row[f"machine_{b}"] = sum(parts.values()) * st["fps"]
            row[f"own_gflops_{b}"] = st["own_gflops"]
            row[f"own_{b}"] = (None if st["own_gflops"] is None
                               else st["flops_per_frame"] * st["fps"] / (st["own_gflops"] * 1e9))
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


def _split_batch(batches: tuple[int, ...]) -> int:
    """The batch whose ideal time the ceiling table splits: 64 (the issue's floor), else the nearest."""
    return min(batches, key=lambda b: abs(b - 64))


def format_ceiling_table(rows: list[dict[str, Any]], batches: tuple[int, ...] = STREAM_BATCHES) -> str:
    """The streams of :func:`bench_steps` rows against the machine: per batch, the fraction of the
    ideal time (GEMM + exp + memory) and the own-shape GEMM rate with its fraction; then, at B = 64
    (or the nearest batch), the ideal microseconds per frame split into its three parts (which
    resource bounds the row)."""
    split = _split_batch(batches)
    head = (["model"] + [f"of machine B={b}" for b in batches]
            + [f"own-shape GEMM B={b} GFLOP/s (of it)" for b in batches]
            + [f"ideal µs/frame B={split}: GEMM + exp + memory"])
    lines = []
    for r in rows:
        cells = [r["model"]] + [percent(r[f"machine_{b}"]) for b in batches]
        cells += [MISSING if r[f"own_gflops_{b}"] is None
                  else f"{r[f'own_gflops_{b}']:.1f} ({percent(r[f'own_{b}'])})" for b in batches]
        parts = [r[f"ideal_{k}_s_{split}"] * 1e6 for k in ("gemm", "exp", "mem")]
        cells.append(f"{sum(parts):.2f} = {parts[0]:.2f} + {parts[1]:.2f} + {parts[2]:.2f}")
        lines.append(cells)
    return markdown_table(head, lines)
