"""``benchmarks/bench_attention_step.py``: its byte count, its span parsing, and a ``--quick`` smoke run
checking the table's shape and that each rate and ratio comes from the row's own numbers (never the
speed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from helpers import benchmark_script


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("bench_attention_step") as module:
        yield module


def test_attended_bytes_counts_the_visible_slots_of_keys_and_values(bench):
    k = torch.zeros(3, 2, 10, 8)  # 3 rows, 2 kv heads, 10 slots of 8 fp32
    state = SimpleNamespace(k=k, pos=torch.tensor([0, 4, 12]))  # 1, 5 and all 10 slots attended
    assert bench.attended_bytes(state, 0) == (1 + 5 + 10) * 2 * 2 * 8 * 4


def test_parse_span_reads_lo_hi_and_names_a_bad_value(bench):
    assert bench.parse_span("60,85") == (60, 85)
    for bad in ("85,60", "0,5", "60", "a,b"):
        with pytest.raises(SystemExit, match=r"--span: .* is not LO,HI"):
            bench.parse_span(bad)


def test_layers_spread_positions_over_the_span(bench):
    args = SimpleNamespace(layers=2, width=8, window=0, rope=True, qk_norm=False, batch=16, span=(5, 9))
    mixers, x = bench.layers(args)
    assert len(mixers) == 2 and x.shape == (16, 8)
    for _, spec, st, start in mixers:
        assert spec.kind == "attention" and torch.equal(st.pos, start)
        assert 5 <= int((st.pos + 1).min()) and int((st.pos + 1).max()) <= 9  # the step attends pos + 1


def test_quick_run_prints_one_consistent_row(bench, capsys):
    bench.main(["--quick"])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| B ")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert len(cells) == len(bench.HEAD) and cells[:3] == ["4", "60-85", "2"]
    mb, ms, cache, read = (float(c) for c in cells[3:7])
    # each cell is rounded (0.1 MB, 0.001 ms, 0.01 GB/s, 1%): allow that rounding, nothing more
    rate = mb / ms  # MB per ms = GB/s
    assert abs(cache - rate) <= rate * (0.05 / mb + 0.0005 / ms) + 0.005
    ratio = cache / read
    assert abs(float(cells[7].rstrip("%")) / 100 - ratio) <= ratio * (0.005 / cache + 0.005 / read) + 0.005
    assert "PYTHONPATH=src python benchmarks/bench_attention_step.py --quick" in out
