"""Throughput, latency and memory measurements (DESIGN §5's protocol), shared by the CLI and every
script in ``benchmarks/``: one way to time, one set of units, one table format.

* :mod:`~hybridssm.bench.timing`: a fixed thread count (the caller sets and prints it), 2 warm-up
  iterations, then repeat until ``max_time`` seconds (3) or ``max_iters`` (20) iterations and
  report the median; the candidates of one comparison are timed in one process, interleaved; a
  path still running after a limit (30 s) is stopped and shown as "—".
* :mod:`~hybridssm.bench.machine`: the fp32 GEMM, ``exp`` (in cache) and single-thread read rates
  measured in the same run, the GEMM rate of a call's own products, matmul FLOPs counted per call,
  and the fraction of the ceiling they imply.
* :mod:`~hybridssm.bench.work`: the transcendental elements and matrix products of a call.
* :mod:`~hybridssm.bench.memory`: peak memory of each row in its own subprocess.
* :mod:`~hybridssm.bench.compare`: the baseline (``nn.TransformerEncoder``, DESIGN §5) and one
  model beside it (``hybridssm bench``).
* :mod:`~hybridssm.bench.steps`: streaming steps against the machine's bar and ceilings.
* :mod:`~hybridssm.bench.tables`: markdown tables and their cells.

Units in every table: throughput in tokens/s (frames/s for streams), latency in ms, peak memory in
MiB, weights in MB (1e6 bytes), GEMM in GFLOP/s, ``exp`` in G elements/s, the read rate in GB/s;
ratios as ``1.23x``, fractions of a ceiling as percentages. All measurements run on random normal
frames ``x [B, T, embed_dim]`` and the whole output sequence.
"""

from __future__ import annotations

from .compare import SHAPES, BaselineTransformer, baseline_for, bench_model, build_row, format_table
from .machine import (
    EXP_ELEMENTS,
    READ_MIB,
    ceiling_fraction,
    cpu_name,
    exp_rate,
    gemv_reader,
    hot_rate,
    machine_line,
    machine_rates,
    matmul_flops,
    param_bytes,
    products_rate,
    read_rate,
    top_ops,
)
from .memory import peak_memory, peak_memory_of
from .steps import (
    STREAM_BATCHES,
    WINDOW,
    StepBench,
    attended_cache_bytes,
    bench_steps,
    format_ceiling_table,
    format_step_table,
    stream_bytes,
)
from .tables import MISSING, cell, command_line, markdown_table, percent, ratio, times
from .timing import (
    BenchSettings,
    input_size,
    measure_modules,
    run_within,
    step_latency,
    time_interleaved,
    time_rounds,
    timing_line,
    window_latency,
    workloads,
)
from .work import TRANSCENDENTALS, Product, Work, count_work

__all__ = [
    "EXP_ELEMENTS",
    "READ_MIB",
    "MISSING",
    "SHAPES",
    "STREAM_BATCHES",
    "TRANSCENDENTALS",
    "WINDOW",
    "BaselineTransformer",
    "BenchSettings",
    "Product",
    "StepBench",
    "Work",
    "attended_cache_bytes",
    "baseline_for",
    "bench_model",
    "bench_steps",
    "build_row",
    "ceiling_fraction",
    "cell",
    "command_line",
    "count_work",
    "cpu_name",
    "exp_rate",
    "gemv_reader",
    "format_ceiling_table",
    "format_step_table",
    "format_table",
    "hot_rate",
    "input_size",
    "machine_line",
    "machine_rates",
    "markdown_table",
    "matmul_flops",
    "measure_modules",
    "param_bytes",
    "peak_memory",
    "peak_memory_of",
    "percent",
    "products_rate",
    "ratio",
    "read_rate",
    "run_within",
    "step_latency",
    "stream_bytes",
    "time_interleaved",
    "time_rounds",
    "times",
    "timing_line",
    "top_ops",
    "window_latency",
    "workloads",
]
