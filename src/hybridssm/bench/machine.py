"""What the machine can do, measured in the same run as the benchmark (DESIGN §5): the fp32 GEMM
rate, the ``exp`` rate in cache and the single-thread memory read rate, the GEMM rate of a call's own
matrix products (:func:`products_rate`), the work a call issues (matmul FLOPs, parameter bytes) and
the fraction of the ceiling those rates imply that a measured time reaches.

Units: GEMM in GFLOP/s, ``exp`` in G elements/s, the read rate in GB/s (1e9 bytes).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EXP_ELEMENTS", "READ_MIB", "best_seconds", "ceiling_fraction", "counting_flops", "cpu_name",
           "exp_rate", "gemv_reader", "hot_rate", "machine_line", "machine_rates", "matmul_flops",
           "param_bytes", "products_rate", "read_rate", "sync", "top_ops"]

# The exp rate's buffer: 64K fp32 elements, 256 KiB in and 256 KiB out, inside a core's L2 (512 KiB
# here; 2 MiB on recent Xeons): the rate of the exps a kernel computes on data in cache.
EXP_ELEMENTS = 1 << 16
READ_MIB = 128  # the read rate's buffer (MiB): larger than the caches


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously; CPU work is done on return)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_rate(seconds: float = 0.5, mib: int = READ_MIB) -> float:
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


def gemv_reader(buf: Tensor) -> Callable[[], Any] | None:
    """A read of the fp32 CPU buffer ``buf`` (a multiple of 1,024 values) through the batch-1 steps'
    GEMV of weights read from memory (``csrc/step/common.h`` ``gemv_streams``: four far-apart
    sequential streams), as a ``[numel / 1024, 1024]`` matrix times a vector of ones; None where the
    step's kernels are not built (or ``buf`` does not fit). One thread reads faster this way than
    ``sum``'s one stream: the single-thread read rate a step can reach is the faster of the two."""
    from hybridssm.ops.step import fused_step_available, step_extension

    fits = buf.device.type == "cpu" and buf.dtype == torch.float32 and buf.numel() % 1024 == 0
    if not fits or not fused_step_available():
        return None
    ext = step_extension()
    W, x, empty = buf.view(-1, 1024), torch.ones(1, 1024), torch.empty(0)
    return lambda: ext.linear(x, W, empty, True)


def hot_rate(fn: Callable[[], Any], work: float, seconds: float, device: torch.device | str = "cpu") -> float:
    """``work`` per call of ``fn`` over the seconds a call takes, in G per second: one untimed call,
    then calls in a loop for ``seconds`` (the same operands each time: hot in the caches)."""
    device = torch.device(device)
    fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync(device)
    return work * n / (time.perf_counter() - t0) / 1e9


def exp_rate(seconds: float = 0.5, device: torch.device | str = "cpu") -> float:
    """The ``exp`` rate in cache (G elements/s): :data:`EXP_ELEMENTS` = 64K fp32 elements into a
    fixed buffer, both inside L2. On CPU it is timed on one thread and multiplied by the torch
    threads: exp on data in cache is work each core does alone, and timing it across threads would
    time the threads' fork and join (on a loaded machine a thread that waits for a core makes one
    call last a scheduler time slice). On a buffer larger than the caches the rate can be the
    memory's."""
    device = torch.device(device)
    v = torch.randn(EXP_ELEMENTS, device=device)
    e = torch.empty_like(v)  # into a fixed buffer: the rate of exp, not of allocating its output
    if device.type != "cpu":
        return hot_rate(lambda: torch.exp(v, out=e), v.numel(), seconds, device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return threads * hot_rate(lambda: torch.exp(v, out=e), v.numel(), seconds, device)
    finally:
        torch.set_num_threads(threads)


def machine_rates(device: torch.device | str = "cpu", seconds: float = 0.5) -> dict[str, float]:
    """Measured fp32 GEMM rate (``gemm_gflops``, GFLOP/s, 512^3), ``exp`` rate in cache
    (``exp_gelems``, G elements/s, :func:`exp_rate`) and, on CPU, the single-thread memory read rate
    (``read_gbs``, GB/s, :func:`read_rate`), each over ``seconds``."""
    device = torch.device(device)
    a = torch.randn(512, 512, device=device)
    out = {"gemm_gflops": hot_rate(lambda: a @ a, 2 * 512**3, seconds, device),
           "exp_gelems": exp_rate(seconds, device)}
    if device.type == "cpu":
        out["read_gbs"] = read_rate(seconds)
    return out


def best_seconds(fn: Callable[[], Any], seconds: float, chunks: int = 5,
                 device: torch.device | str = "cpu") -> float:
    """Seconds per call of ``fn`` in the fastest of ``chunks`` loops that share ``seconds`` (after one
    untimed call; the same operands each time, hot): the least disturbed by other load."""
    device = torch.device(device)
    fn()
    sync(device)
    best = math.inf
    for _ in range(chunks):
        n, t0 = 0, time.perf_counter()
        while n == 0 or time.perf_counter() - t0 < seconds / chunks:
            fn()
            n += 1
        sync(device)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def products_rate(products: Mapping[Any, int], seconds: float, device: torch.device | str = "cpu",
                  cache: dict[Any, tuple[float, float]] | None = None) -> float | None:
    """The GEMM rate (GFLOP/s) of a call's own matrix products (``product -> times made``, as
    :func:`hybridssm.bench.work.count_work` records them): their FLOPs over the time they take
    together, each timed alone and hot (:func:`best_seconds` over ``seconds``) less the cost of
    calling the op from Python (the same op on 1 x 1 operands, :meth:`~hybridssm.bench.work.Product.tiny`),
    which a fused step does not pay; at least half of its time is kept, so that timing noise on a tiny
    product cannot make it free. ``cache`` keeps (FLOPs, seconds) of each product and of each 1 x 1
    call timed, so that a run times each shape once. None when there are no products."""
    cache = {} if cache is None else cache
    flops = total = 0.0
    for product, made in products.items():
        if product not in cache:
            twin = product.tiny()
            if twin not in cache:
                cache[twin] = (0.0, best_seconds(twin.replay(device), seconds / 4, device=device))
            fn = product.replay(device)
            took = best_seconds(fn, seconds, device=device)
            cache[product] = (matmul_flops(fn), max(took - cache[twin][1], took / 2))
        work, took = cache[product]
        flops += made * work
        total += made * took
    return flops / total / 1e9 if total and flops else None


@contextlib.contextmanager
def counting_flops() -> Iterator[Callable[[], int]]:
    """Count matrix-product FLOPs inside the block (as :func:`matmul_flops` does); yields a function
    that gives the count so far."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)

    def total() -> int:
        per_op = counter.get_flop_counts().get("Global", {})
        return int(sum(v for op, v in per_op.items() if "convolution" not in str(op)))

    try:
        with counter:
            yield total
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def matmul_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products (mm, bmm, addmm, baddbmm, SDPA, forward and backward) of one
    call of ``fn``, counted by ``torch.utils.flop_counter.FlopCounterMode``: the work a GEMM ceiling
    bounds (``flops / machine_rates()["gemm_gflops"]`` is the ideal time). A fused kernel is opaque
    to the counter: its products are not counted. ``nn.TransformerEncoder``'s inference fast path
    (one native op per layer, same products) is switched off while counting, so that they are.

    Convolutions are left out: the models' convolutions are depthwise (no GEMM), and torch 2.x
    counts a grouped convolution's backward as if it were dense (``groups`` ignored), which would
    add ~0.5 GFLOP per Mamba layer at (32, 60, 256) that is not there."""
    with counting_flops() as total:
        fn()
    return total()


def top_ops(fn: Callable[[], Any], calls: int = 1, row_limit: int = 15) -> str:
    """``torch.profiler``'s table of the ops that took the most self CPU time over ``calls`` calls of
    ``fn``, after one untimed call (what limits a row)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def param_bytes(model: nn.Module) -> int:
    """Bytes of every parameter: what a batch-1 step reads at least once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def ceiling_fraction(seconds: float | None, rates: Mapping[str, float], flops: float | None,
                     exps: float = 0.0) -> float | None:
    """The ideal time of ``flops`` matmul FLOPs at the GEMM rate plus ``exps`` exponentials at the
    ``exp`` rate, over the measured ``seconds`` (1 = at the ceiling); None when either is missing."""
    if flops is None or not seconds:
        return None
    ideal = flops / (rates["gemm_gflops"] * 1e9) + exps / (rates["exp_gelems"] * 1e9)
    return ideal / seconds


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine()


def machine_line(rates: Mapping[str, float], threads: str, kernels: Mapping[str, Any] | None = None) -> str:
    """The line every benchmark prints above its tables: CPU, cores, torch, ``threads`` (as the
    benchmark states them, e.g. ``"2 (step latency: 1)"``), the rates measured in this run, the load
    average now and, given ``hs.kernels()``'s answer, the ops on fused kernels."""
    parts = [f"{cpu_name()}, {os.cpu_count()} cores", f"torch {torch.__version__}", f"threads {threads}"]
    measured = [f"fp32 GEMM {rates['gemm_gflops']:.1f} GFLOP/s (512^3)",
                f"exp {rates['exp_gelems']:.2f} G elem/s (in L2, {EXP_ELEMENTS // 1024}K elements, one "
                "thread's x threads)"]
    if "read_gbs" in rates:
        measured.append(f"single-thread read {rates['read_gbs']:.1f} GB/s")
    parts.append("measured: " + ", ".join(measured))
    if hasattr(os, "getloadavg"):
        parts.append(f"load average at start {os.getloadavg()[0]:.1f}")
    if kernels is not None:
        fused = [k for k, v in kernels.items() if v["backend"] == "fused"]
        parts.append(f"fused kernels: {', '.join(fused) or 'none'}")
    return "; ".join(parts)
