"""Throughput, latency and memory measurements (DESIGN §5's protocol), shared by the CLI and
``benchmarks/``.

* Timing: a fixed thread count (reported), 2 warm-up iterations, then repeat until ``max_time``
  seconds (3) or ``max_iters`` (20) iterations and report the median; the candidates of one
  comparison are timed in one process, interleaved iteration by iteration.
* Baseline: :class:`BaselineTransformer`, ``torch.nn.TransformerEncoder`` with ``d_model =
  hidden_size``, ``nhead = num_heads`` (4 where the model has none), ``dim_feedforward = 4 *
  hidden_size``, dropout 0, ``batch_first``, ``norm_first``, GELU, the model's ``num_layers``, a
  causal mask with ``is_causal=True`` and the same input projection.
* Step latency: batch 1, ``inplace=True``, the median over ``latency_steps`` (1,000) steps after
  warm-up, beside re-running the whole window (the seeds' alternative to a state).
* Peak memory: each row in its own subprocess (``python -m hybridssm.bench``): the growth of the
  peak resident set (CPU) or of ``max_memory_allocated`` (CUDA) over one forward+backward.

All measurements run on the model's output features (``x [B, T, embed_dim]`` random normal).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from hybridssm.ops._kernels import use_kernels
from hybridssm.registry import build

__all__ = [
    "BaselineTransformer",
    "BenchSettings",
    "baseline_for",
    "time_interleaved",
    "step_latency",
    "window_latency",
    "peak_memory",
    "machine_rates",
    "bench_model",
    "format_table",
    "workloads",
    "matmul_flops",
    "read_rate",
    "param_bytes",
    "attended_cache_bytes",
    "StepBench",
    "bench_steps",
    "format_step_table",
    "SHAPES",
    "STREAM_BATCHES",
    "WINDOW",
]

# DESIGN §5: the seeds' real-time case and the long shapes (8,192 tokens per batch).
SHAPES = {"short": [(32, 60)], "long": [(32, 256), (4, 2048), (2, 4096)]}


class BaselineTransformer(nn.Module):
    """DESIGN §5's baseline: input projection -> ``nn.TransformerEncoder`` (pre-norm, GELU, FFN
    x4, dropout 0, causal) ``[B, T, embed_dim] -> [B, T, hidden_size]``."""

    def __init__(self, embed_dim: int, hidden_size: int, num_heads: int, num_layers: int) -> None:
        super().__init__()
        self.embed_dim, self.hidden_size = embed_dim, hidden_size
        self.input_proj = nn.Linear(embed_dim, hidden_size) if embed_dim != hidden_size else nn.Identity()
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, 4 * hidden_size, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device, dtype=x.dtype)
        return self.encoder(self.input_proj(x), mask=mask, is_causal=True)


def baseline_for(model: nn.Module) -> BaselineTransformer:
    """The baseline of the same width, depth and input size as ``model``."""
    c = model.config
    heads = getattr(c, "num_heads", 4)
    if c.hidden_size % heads:
        heads = 1  # nn.MultiheadAttention needs heads | width; only tiny test sizes hit this
    return BaselineTransformer(c.embed_dim, c.hidden_size, heads, c.num_layers)


@dataclass
class BenchSettings:
    """How long to measure. ``max_time`` / ``max_iters`` / ``warmup`` per candidate."""

    warmup: int = 2
    max_time: float = 3.0
    max_iters: int = 20
    latency_steps: int = 1000
    latency_warmup: int = 20
    memory: bool = True
    extra_env: Mapping[str, str] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], settings: BenchSettings,
                     device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, timed alternately (one call of each in turn)."""
    for fn in fns.values():
        for _ in range(settings.warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    spent = dict.fromkeys(fns, 0.0)
    active = list(fns)
    while active:
        for name in list(active):
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            dt = time.perf_counter() - t0
            times[name].append(dt)
            spent[name] += dt
            if spent[name] >= settings.max_time or len(times[name]) >= settings.max_iters:
                active.remove(name)
    return {k: statistics.median(v) for k, v in times.items()}


def _fwd_bwd(model: nn.Module, x: Tensor, sequence: bool) -> Callable[[], None]:
    def run() -> None:
        y = model(x, return_sequence=True) if sequence else model(x)
        y.float().square().mean().backward()
        for p in model.parameters():
            p.grad = None

    return run


def _fwd(model: nn.Module, x: Tensor, sequence: bool) -> Callable[[], None]:
    @torch.no_grad()
    def run() -> None:
        model(x, return_sequence=True) if sequence else model(x)

    return run


@torch.no_grad()
def step_latency(model: nn.Module, settings: BenchSettings) -> float:
    """Median seconds of ``model.step(x_t, state, inplace=True)`` at batch 1."""
    p = next(model.parameters())
    state = model.init_state(1)
    x = torch.randn(1, model.config.embed_dim, device=p.device, dtype=p.dtype)
    for _ in range(settings.latency_warmup):
        model.step(x, state, inplace=True)
    _sync(p.device)
    times = []
    for _ in range(settings.latency_steps):
        t0 = time.perf_counter()
        model.step(x, state, inplace=True)
        _sync(p.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def window_latency(model: nn.Module, window: int, settings: BenchSettings) -> float:
    """Median seconds of re-running the last ``window`` frames at batch 1 (no state)."""
    p = next(model.parameters())
    x = torch.randn(1, window, model.embed_dim if isinstance(model, BaselineTransformer)
                    else model.config.embed_dim, device=p.device, dtype=p.dtype)
    n = max(5, min(settings.latency_steps // 10, 200))
    for _ in range(settings.latency_warmup):
        model(x)
    _sync(p.device)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        model(x)
        _sync(p.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- peak memory (one subprocess per row) ---------------------------------------------------------
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


def _peak_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the subprocess: build the row's module, one forward+backward, report the growth."""
    import resource

    for mod in spec.get("imports", []):
        __import__(mod)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = build(spec["model"], **spec["options"]).to(device)
    if spec["baseline"]:
        model = baseline_for(model).to(device)
    B, T = spec["shape"]
    E = model.embed_dim if spec["baseline"] else model.config.embed_dim
    x = torch.randn(B, T, E, device=device)
    run = (lambda: _baseline_fwd_bwd(model, x)) if spec["baseline"] else _fwd_bwd(model, x, True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run()
        return {"peak_mib": (torch.cuda.max_memory_allocated(device) - before) / 2**20}
    # CPU: growth of the peak resident set over the run, from a freshly reset peak mark.
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        run()
        after = _status_kib("VmHWM")
    else:  # pragma: no cover - ru_maxrss cannot be reset; it may include import-time peaks
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": max(0, after - before) / 1024}


def peak_memory(model_name: str, options: Mapping[str, Any], shape: tuple[int, int], *,
                baseline: bool = False, device: str = "cpu", threads: int | None = None,
                imports: list[str] | None = None, timeout: float = 600) -> float | None:
    """MiB of extra peak memory of one forward+backward, measured in a fresh subprocess (None
    when the subprocess fails)."""
    spec = {
        "model": model_name, "options": dict(options), "shape": list(shape), "baseline": baseline,
        "device": device, "threads": threads or torch.get_num_threads(), "imports": imports or [],
    }
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hybridssm.bench", json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout, env=env, check=True,
        )
        return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"])
    except (subprocess.SubprocessError, ValueError, KeyError, IndexError):
        return None


# -- machine ceilings -----------------------------------------------------------------------------
def read_rate(seconds: float = 0.5, mib: int = 128) -> float:
    """Single-thread memory read rate (GB/s): ``sum`` of an fp32 buffer larger than the caches, on
    one torch thread (the rate a batch-1 step that reads each weight once can reach)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        buf = torch.ones(mib * 2**20 // 4)
        buf.sum()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            buf.sum()
            n += 1
        return buf.numel() * 4 * n / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(threads)


def machine_rates(device: torch.device | str = "cpu", seconds: float = 0.5) -> dict[str, float]:
    """Measured fp32 GEMM rate (GFLOP/s, 512^3), ``exp`` rate (G elements/s, 4M elements) and,
    on CPU, the single-thread memory read rate (``read_gbs``, :func:`read_rate`)."""
    device = torch.device(device)
    a = torch.randn(512, 512, device=device)
    v = torch.randn(1 << 22, device=device)

    def rate(fn, work: float) -> float:
        fn()
        _sync(device)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        _sync(device)
        return work * n / (time.perf_counter() - t0) / 1e9

    out = {"gemm_gflops": rate(lambda: a @ a, 2 * 512**3), "exp_gelems": rate(lambda: v.exp(), v.numel())}
    if device.type == "cpu":
        out["read_gbs"] = read_rate(seconds)
    return out


# -- one model beside its baseline ----------------------------------------------------------------
def bench_model(model_name: str, options: Mapping[str, Any], shape: tuple[int, int], *,
                settings: BenchSettings | None = None, device: str = "cpu", baseline: bool = True,
                imports: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows (the model, then the baseline) with forward+backward and forward tokens/s, step and
    window latency (ms) and peak memory (MiB); ``ratio`` = the model's fwd+bwd rate over the
    baseline's."""
    settings = settings or BenchSettings()
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build(model_name, **options).to(dev)
    cands: dict[str, nn.Module] = {model_name: model}
    if baseline:
        cands["nn.TransformerEncoder"] = baseline_for(model).to(dev)
    B, T = shape
    x = torch.randn(B, T, model.config.embed_dim, device=dev)
    train_fns, fwd_fns = {}, {}
    for name, m in cands.items():
        seq = name == model_name
        m.train()
        train_fns[name] = _fwd_bwd(m, x, seq) if seq else (lambda m=m: _baseline_fwd_bwd(m, x))
        fwd_fns[name] = _fwd(m, x, seq) if seq else (lambda m=m: _baseline_fwd(m, x))
    t_train = time_interleaved(train_fns, settings, dev)
    for m in cands.values():
        m.eval()
    t_fwd = time_interleaved(fwd_fns, settings, dev)
    rows = []
    for name, m in cands.items():
        is_model = name == model_name
        row = {
            "model": name,
            "shape": f"({B}, {T})",
            "fwd_bwd_tok_s": B * T / t_train[name],
            "fwd_tok_s": B * T / t_fwd[name],
            "step_ms": step_latency(m, settings) * 1e3 if is_model else None,
            "window_ms": window_latency(m, T, settings) * 1e3,
            "params": sum(p.numel() for p in m.parameters()),
            "peak_mib": (
                peak_memory(model_name, options, shape, baseline=not is_model, device=device,
                            threads=torch.get_num_threads(), imports=imports)
                if settings.memory else None
            ),
        }
        rows.append(row)
    if baseline:
        base = rows[-1]["fwd_bwd_tok_s"]
        for r in rows:
            r["ratio"] = r["fwd_bwd_tok_s"] / base
    return rows


def _baseline_fwd_bwd(m: nn.Module, x: Tensor) -> None:
    m(x).square().mean().backward()
    for p in m.parameters():
        p.grad = None


@torch.no_grad()
def _baseline_fwd(m: nn.Module, x: Tensor) -> None:
    m(x)


def workloads(m: nn.Module, x: Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """``(forward+backward, forward)`` callables of a model (whole output sequence) or of a
    :class:`BaselineTransformer`, as :func:`bench_model` times them."""
    if isinstance(m, BaselineTransformer):
        return (lambda: _baseline_fwd_bwd(m, x)), (lambda: _baseline_fwd(m, x))
    return _fwd_bwd(m, x, True), _fwd(m, x, True)


def matmul_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products (mm, bmm, addmm, baddbmm, SDPA, forward and backward) of one
    call of ``fn``, counted by ``torch.utils.flop_counter.FlopCounterMode``: the work a GEMM ceiling
    bounds (``flops / machine_rates()["gemm_gflops"]`` is the ideal time).

    Convolutions are left out: the models' convolutions are depthwise (no GEMM), and torch 2.x
    counts a grouped convolution's backward as if it were dense (``groups`` ignored), which would
    add ~0.5 GFLOP per Mamba layer at (32, 60, 256) that is not there."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    per_op = counter.get_flop_counts().get("Global", {})
    return int(sum(v for op, v in per_op.items() if "convolution" not in str(op)))


def _fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_model` rows."""
    head = ("| model | shape (B, T) | params | fwd+bwd tok/s | ratio | fwd tok/s | step ms (B=1) "
            "| window ms (B=1) | peak MiB |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['params']:,} | {_fmt(r['fwd_bwd_tok_s'], ',.0f')} | "
            f"{_fmt(r.get('ratio'), '.2f')} | {_fmt(r['fwd_tok_s'], ',.0f')} | "
            f"{_fmt(r['step_ms'], '.3f')} | {_fmt(r['window_ms'], '.3f')} | {_fmt(r['peak_mib'], '.1f')} |"
        )
    return "\n".join(lines)


# -- streaming steps (benchmarks/bench_step.py) -----------------------------------------------------
WINDOW = 60  # the seeds' real-time window (frames)
STREAM_BATCHES = (16, 64, 256)


def param_bytes(model: nn.Module) -> int:
    """Bytes of every parameter: what a batch-1 step reads at least once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


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
    runs = {}
    for label, model in models.items():
        state = _prefilled(model, 1, None)  # the default capacity: what a user streams with
        saved = state.clone()
        p = next(model.parameters())
        x = torch.randn(1, model.config.embed_dim, device=p.device, dtype=p.dtype)
        for _ in range(plan.warmup):
            model.step(x, state, inplace=True)
        runs[label] = (model, state, saved, x, [], [])
    per_round = max(1, plan.steps // plan.rounds)
    for _ in range(plan.rounds):
        for model, state, saved, x, times, cache in runs.values():
            _restore(state, saved)
            cache.append(attended_cache_bytes(state))
            for _ in range(per_round):
                t0 = time.perf_counter()
                model.step(x, state, inplace=True)
                _sync(x.device)
                times.append(time.perf_counter() - t0)
            cache.append(attended_cache_bytes(state))
    return {k: {"step_s": statistics.median(r[4]), "cache_bytes": statistics.mean(r[5])}
            for k, r in runs.items()}


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
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], _fmt(r["weights_mb"], ".1f"), _fmt(r["bar_ms"], ".3f"),
                 _fmt(r["step_ms"], ".3f"),
                 _fmt(r["step_bar"], ".1f") + "x", _fmt(r["window_ms"], ".2f"),
                 "—" if r["window_step"] is None else _fmt(r["window_step"], ".1f") + "x"]
        cells += [f"{r[f'fps_{b}']:,.0f} ({r[f'gemm_{b}']:.0%})" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # the peak-memory subprocess
    print(json.dumps(_peak_child(json.loads(sys.argv[1]))))
