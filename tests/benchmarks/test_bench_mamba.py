"""``benchmarks/bench_mamba.py``: its rows, footnotes and exponential counts, the factory its
peak-memory subprocesses use, and a ``--quick`` smoke run checking the tables' shape."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from helpers import benchmark_script

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_mamba.py"


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_mamba") as module:
        yield module


def test_rows_selection_and_shapes(bench):
    names = [r.name for r in bench.rows()]
    assert names[0] == "hybridssm mamba" and names[-1] == bench.BASELINE
    assert [r.name for r in bench.select(bench.rows(), "kernels")] == [
        "hybridssm mamba2 (torch kernels)", bench.BASELINE]
    assert bench.parse_shapes("32x60,4X2048") == [(32, 60), (4, 2048)]
    with pytest.raises(ValueError, match="--shapes must be comma-separated BxT pairs"):
        bench.parse_shapes("32x60x2")


def test_rows_that_do_not_run_get_one_footnote_each(bench):
    notes = bench.Notes()
    seq = next(r for r in bench.rows() if r.name == "transformers Mamba (sequential)")
    assert bench.why_not_run(seq, 256, {}, 30.0) is None
    beyond = bench.why_not_run(seq, 2048, {}, 30.0)
    assert beyond.startswith("transformers Mamba (sequential) runs up to T=256 only")
    assert notes.mark(beyond) == notes.mark(bench.why_not_run(seq, 4096, {}, 30.0)) == "— [1]"
    ours = bench.rows()[0]
    assert bench.why_not_run(ours, 60, {ours.name: 256}, 30.0) is None  # stopped at a longer shape
    stopped = bench.why_not_run(ours, 2048, {ours.name: 256}, 30.0)
    assert "after 30 s" in stopped and notes.mark(stopped) == "— [2]"
    assert notes.lines() == [f"[1] {beyond}", f"[2] {stopped}"]


def test_exponentials_per_row_kind(bench):
    assert bench.exps("mamba", (2, 3), 8, 2, train=False) == 2 * 2 * 3 * 16 * 16
    assert bench.exps("mamba2", (2, 3), 64, 1, train=True) == 2 * (2 * 3 * 2)
    assert bench.exps("attention", (1, 4), 8, 1, train=False) == 4 * 4 * 4 / 2


def test_memory_table_measures_each_row_and_shape_by_the_script_factory(bench, monkeypatch):
    calls = []

    def fake(factory, args, shape, **kw):
        calls.append((factory, args, shape))
        return 12.0

    monkeypatch.setattr(bench, "peak_memory_of", fake)
    args = argparse.Namespace(hidden=16, layers=1, threads=1, slow_limit=30.0)
    table = [r for r in bench.rows() if r.name in ("hybridssm mamba", "transformers Mamba (sequential)")]
    out, notes = [], bench.Notes()
    bench.memory(args, table, [(2, 8), (1, 512)], None, {}, notes, out)
    lines = out[-1].splitlines()
    assert lines[2] == "| hybridssm mamba | 12 | 12 |"
    assert lines[3] == "| transformers Mamba (sequential) | 12 | — [1] |"  # beyond T=256
    assert calls[0] == (f"{SCRIPT}:build_row", ["hybridssm mamba", 16, 1], (2, 8)) and len(calls) == 3


@pytest.mark.slow  # loads the fused kernels and transformers' models: seconds
def test_every_row_builds_and_the_memory_child_rebuilds_it(bench):
    from hybridssm.bench import input_size
    from hybridssm.bench.memory import measure_child

    x = torch.randn(2, 5, bench.EMBED)
    for name in bench.BUILDERS:
        if name == "transformers Mamba (mambapy)" and importlib.util.find_spec("mambapy") is None:
            continue
        row = bench.build_row(name, 16, 1)
        assert input_size(row) == bench.EMBED
        assert (row(x, return_sequence=True) if hasattr(row, "init_state") else row(x)).shape == (2, 5, 16)
    threads = torch.get_num_threads()
    try:
        res = measure_child({"factory": f"{SCRIPT}:build_row", "args": ["hybridssm mamba", 16, 1],
                             "shape": [2, 8], "device": "cpu", "threads": 1})
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("bench_mamba", None)  # the child's copy of the script
    assert res["peak_mib"] >= 0


@pytest.mark.slow
def test_bench_mamba_quick(bench, tmp_path):
    sys.modules["bench_mamba"] = bench
    out = tmp_path / "bench.md"
    threads = torch.get_num_threads()
    try:
        text = bench.main(["--quick", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert out.read_text().strip() == text.strip()
    assert "threads 1" in text and "GFLOP/s" in text and "Units: tokens/s, MiB, ms" in text
    tables = [block for block in text.split("\n\n") if block.startswith("|")]
    assert len(tables) == 4  # fwd+bwd, fwd, speed ratios, streaming (--quick: no peak memory)
    rows = [r.name for r in bench.rows()]
    for table in tables[:2]:
        lines = table.splitlines()
        assert [line.split("|")[1].strip() for line in lines[2:]] == rows
        assert all(line.count("|") == 2 + len(bench.QUICK_SHAPES) for line in lines)
    assert "| TransformerEncoder (baseline) | " in tables[0] and "(1.00x; " in tables[0]
    assert "| hybridssm mamba | transformers Mamba (sequential) | " in tables[2]
    streaming = tables[3]
    assert "| hybridssm mamba step (inplace) | " in streaming and "| 1.00x |" in streaming
    assert "transformers Mamba cached step" in streaming
