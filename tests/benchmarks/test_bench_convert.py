"""``benchmarks/bench_convert.py``: its row arithmetic, and a ``--quick`` smoke run checking the
table's shape and that each ratio comes from the times in its row (never the speed)."""

from __future__ import annotations

import pytest

from helpers import benchmark_script


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("transformers")
    with benchmark_script("bench_convert") as module:
        yield module


def test_row_turns_times_and_bytes_into_ms_ratios_and_the_bar(bench):
    cells = bench.row("x", {"hf_s": 6e-3, "ours_s": 2e-3, "bytes": 4e6}, read_gbs=8.0)
    # bar: 4 MB at 8 GB/s = 0.5 ms; step / bar = 2 / 0.5
    assert cells == ["x", "6.00", "2.00", "**3.00x**", "4.0", "0.50", "4.00x"]


def test_quick_run_prints_one_checked_row_per_source(bench, capsys):
    bench.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| source")]
    assert [ln.split(" | ")[0][2:] for ln in lines] == list(bench.sources(8))
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(bench.HEAD)
        hf_ms, ours_ms = float(cells[1]), float(cells[2])
        # the cells are rounded to 0.01 ms: allow that rounding, nothing more
        slack = (hf_ms / ours_ms) * (0.005 / hf_ms + 0.005 / ours_ms) + 0.005
        assert abs(float(cells[3].strip("*x")) - hf_ms / ours_ms) <= slack
    assert "PYTHONPATH=src python benchmarks/bench_convert.py --quick" in out
