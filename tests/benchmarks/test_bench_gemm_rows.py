"""``benchmarks/bench_gemm_rows.py``: its row arithmetic, its shape parsing, and a ``--quick`` smoke
run checking the table's shape and that each ratio comes from the rates in its row (never the speed)."""

from __future__ import annotations

import pytest

from helpers import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_gemm_rows") as module:
        yield module


def test_row_prints_rates_and_ours_over_mkl(bench):
    cells = bench.row(256, 1024, 64, {"hot_ours": 60.0, "hot_mkl": 40.0, "cold_ours": 30.0, "cold_mkl": 40.0})
    assert cells == ["256x1024", "64", "60.0", "40.0", "1.50x", "30.0", "40.0", "0.75x"]


def test_calls_are_timed_in_cpu_time_not_wall_time(bench):
    # a call that waits (as one preempted by another process does) counts only what it computed
    import time

    waits, spins = bench.median_seconds([lambda c: time.sleep(0.02), lambda c: sum(range(20000))], 3)
    assert waits < 0.005  # the wall clock gives >= 0.02
    assert spins > 0


def test_parse_shapes_reads_ixo_and_names_a_bad_item(bench):
    assert bench.parse_shapes("256x1024, 512x48") == [(256, 1024), (512, 48)]
    with pytest.raises(SystemExit, match=r"--shapes: '256x0' is not IxO"):
        bench.parse_shapes("256x256,256x0")


def test_quick_run_prints_one_checked_row_per_shape_and_batch(bench, capsys):
    bench.main(["--quick"])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| I x O")]
    assert [tuple(c.strip() for c in ln.strip("|").split("|")[:2]) for ln in lines] == [
        ("64x40", "5"), ("64x40", "16"), ("48x8", "5"), ("48x8", "16")]
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(bench.HEAD)
        for ours, mkl, ratio in ((cells[2], cells[3], cells[4]), (cells[5], cells[6], cells[7])):
            # rates rounded to 0.1: allow that rounding, nothing more
            q = float(ours) / float(mkl)
            assert abs(float(ratio.rstrip("x")) - q) <= q * (0.05 / float(ours) + 0.05 / float(mkl)) + 0.005
    assert "GEMM 512^3:" in out and "PYTHONPATH=src python benchmarks/bench_gemm_rows.py --quick" in out
