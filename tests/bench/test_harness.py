"""The benchmark harness (:mod:`hybridssm.bench`) on tiny callables and modules: how it times,
counts, stops slow rows, measures memory and prints tables (never how fast anything is)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import hybridssm as hs
from hybridssm.bench import (
    BenchSettings,
    ceiling_fraction,
    cell,
    command_line,
    input_size,
    machine_line,
    markdown_table,
    matmul_flops,
    measure_modules,
    peak_memory_of,
    percent,
    ratio,
    run_within,
    time_interleaved,
    time_rounds,
    times,
    top_ops,
    workloads,
)
from hybridssm.bench.memory import measure_child, resolve_factory

FEW = BenchSettings(warmup=2, max_time=10.0, max_iters=3)


class Projection(nn.Module):
    """A reference-style row: ``[B, T, E] -> [B, T, H]`` with an ``embed_dim`` attribute."""

    def __init__(self, embed_dim: int = 8, hidden: int = 4, pause: float = 0.0) -> None:
        super().__init__()
        self.embed_dim, self.pause = embed_dim, pause
        self.proj = nn.Linear(embed_dim, hidden, bias=False)

    def forward(self, x):
        for _ in range(int(self.pause / 0.01)):
            time.sleep(0.01)  # a slow path: many short ops
        return self.proj(x)


def test_time_interleaved_warms_up_then_alternates_until_max_iters():
    calls = []
    medians = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, FEW)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())


def test_time_interleaved_stops_a_candidate_at_max_time():
    calls = []
    settings = BenchSettings(warmup=0, max_time=0.02, max_iters=50)
    time_interleaved({"slow": lambda: (calls.append("slow"), time.sleep(0.015)),
                      "fast": lambda: calls.append("fast")}, settings)
    assert calls.count("slow") == 2 and calls.count("fast") == 50


def test_time_rounds_interleaves_rounds_with_hooks():
    calls = []
    hook = []
    medians = time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 4, rounds=2,
                          warmup=1, before_round=lambda k: hook.append(("start", k)),
                          after_round=lambda k: hook.append(("end", k)))
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 2
    assert hook == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")] * 2
    assert set(medians) == {"a", "b"}


def test_run_within_stops_a_slow_path():
    assert run_within(lambda: None, 1.0)
    assert not run_within(lambda: [time.sleep(0.01) for _ in range(1000)], 0.05)
    assert run_within(lambda: time.sleep(0.02), 0)  # no limit


def test_matmul_flops_counts_forward_and_backward():
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(3, 8)
    # forward 2*3*8*4; backward: grad of the weight only (x needs no grad), the same again
    assert matmul_flops(lambda: lin(x).sum().backward()) == 2 * (2 * 3 * 8 * 4)


def test_matmul_flops_see_through_the_encoder_fast_path():
    from hybridssm.bench import BaselineTransformer

    base = BaselineTransformer(embed_dim=20, hidden_size=32, num_heads=4, num_layers=2).eval()
    x = torch.randn(2, 8, 20)
    with torch.no_grad():
        inference = matmul_flops(lambda: base(x))  # the encoder's fast path would hide its products
    projections = 2 * 2 * 8 * (20 * 32 + 2 * (3 * 32 * 32 + 32 * 32 + 2 * 4 * 32 * 32))
    assert inference >= projections and torch.backends.mha.get_fastpath_enabled()


def test_workloads_run_the_whole_sequence_and_drop_gradients():
    model = hs.build("gated_ssm", embed_dim=6, hidden_size=8, num_layers=1)
    x = torch.randn(2, 5, 6)
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    fwd_bwd, fwd = workloads(model, x)
    fwd_bwd()
    fwd()
    assert seen == [torch.Size([2, 5, 8])] * 2  # return_sequence=True, both times
    assert all(p.grad is None for p in model.parameters())
    assert input_size(model) == 6 and input_size(Projection(embed_dim=3)) == 3


def test_measure_modules_rows_flops_and_slow_rows():
    x = torch.randn(2, 5, 8)
    rows = {"fast": Projection(), "slow": Projection(pause=0.3)}
    res = measure_modules(rows, x, FEW, slow_limit=0.1, count_fwd_flops=True)
    fast, slow = res["fast"], res["slow"]
    assert fast["fwd_bwd_tok_s"] == pytest.approx(10 / fast["fwd_bwd_s"])
    assert fast["fwd_tok_s"] == pytest.approx(10 / fast["fwd_s"])
    assert fast["flops"] == 2 * (2 * 10 * 8 * 4) and fast["fwd_flops"] == 2 * 10 * 8 * 4
    assert not fast["too_slow"] and not rows["fast"].training  # forward timed in eval mode
    assert slow["too_slow"] and slow["fwd_bwd_s"] is slow["fwd_s"] is slow["flops"] is None
    assert slow["first_s"] >= 0.1
    res = measure_modules({"fast": Projection()}, x, FEW, forward=False, count_flops=False)
    assert res["fast"]["fwd_s"] is None and res["fast"]["flops"] is None and res["fast"]["fwd_bwd_s"] > 0
    res = measure_modules({"fast": Projection()}, x, FEW)  # the forward's FLOPs only when asked
    assert res["fast"]["flops"] > 0 and res["fast"]["fwd_flops"] is None and res["fast"]["fwd_s"] > 0


def test_ceiling_fraction_adds_gemm_and_exp_time():
    rates = {"gemm_gflops": 2.0, "exp_gelems": 0.5}
    assert ceiling_fraction(4.0, rates, flops=4e9, exps=1e9) == pytest.approx((2.0 + 2.0) / 4.0)
    assert ceiling_fraction(2.0, rates, flops=4e9) == pytest.approx(1.0)
    assert ceiling_fraction(None, rates, flops=1.0) is None and ceiling_fraction(1.0, rates, None) is None


def test_table_cells_and_format():
    assert cell(1234.5, ",.0f") == "1,234" and cell(None, ".1f") == "—" and cell(2.0, ".1f", "x") == "2.0x"
    assert times(1.234) == "1.23x" and percent(0.456) == "46%" and percent(0.0012) == "0.1%"
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0.0) is None
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    with pytest.raises(ValueError, match="1 cells, the header 2"):
        markdown_table(["a", "b"], [["1"]])


def test_quick_settings_and_command_line():
    quick = BenchSettings.quick(max_time=0.5)
    assert (quick.warmup, quick.max_iters, quick.max_time, quick.memory) == (1, 2, 0.5, False)
    assert BenchSettings().max_time == 3.0 and BenchSettings().max_iters == 20  # DESIGN §5
    line = command_line("benchmarks/x.py", ["--only", "a b"])
    assert line == "PYTHONPATH=src python benchmarks/x.py --only 'a b'"


def test_machine_line_states_threads_rates_and_kernels():
    rates = {"gemm_gflops": 12.34, "exp_gelems": 0.5, "read_gbs": 9.87}
    kernels = {"scan": {"backend": "fused"}, "x": {"backend": "torch"}}
    line = machine_line(rates, "2 (step latency: 1)", kernels)
    assert "threads 2 (step latency: 1)" in line and "fp32 GEMM 12.3 GFLOP/s" in line
    assert "exp 0.50 G elem/s (in L2, 64K elements, one thread's x threads)" in line
    assert "single-thread read 9.9 GB/s" in line
    assert line.endswith("fused kernels: scan") and f"torch {torch.__version__}" in line


def test_top_ops_names_the_ops():
    lin = nn.Linear(8, 4)
    assert "aten::" in top_ops(lambda: lin(torch.randn(3, 8)), row_limit=5)


FACTORY = '''
from torch import nn

class Row(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.embed_dim, self.proj = width, nn.Linear(width, width)

    def forward(self, x):
        return self.proj(x)

def make(width):
    return Row(width)
'''


def test_memory_child_builds_the_row_from_a_file_factory(tmp_path):
    path = tmp_path / "rows.py"
    path.write_text(FACTORY)
    assert resolve_factory(f"{path}:make")(3).embed_dim == 3
    with pytest.raises(ValueError, match="factory must be"):
        resolve_factory("no_colon")
    threads = torch.get_num_threads()
    try:
        res = measure_child({"factory": f"{path}:make", "args": [16], "shape": [4, 32], "device": "cpu",
                             "threads": 1})
    finally:
        torch.set_num_threads(threads)
    assert set(res) == {"peak_mib"} and res["peak_mib"] >= 0


@pytest.mark.slow  # a fresh interpreter importing torch: seconds on a loaded machine
def test_peak_memory_of_a_file_factory_in_a_subprocess(tmp_path):
    path = tmp_path / "rows.py"
    path.write_text(FACTORY)
    assert peak_memory_of(f"{path}:make", [16], (4, 32), threads=1) >= 0
    assert peak_memory_of(f"{path}:missing", [16], (4, 32), threads=1) is None
