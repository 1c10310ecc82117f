"""``benchmarks/bench_models.py``: its helpers, and a ``--quick`` smoke run checking the tables' shape."""

from __future__ import annotations

import json

import pytest
import torch

import hybridssm as hs
from helpers import benchmark_script


@pytest.fixture(scope="module")
def bm():
    with benchmark_script("bench_models") as module:
        yield module


def test_options_follow_the_seeds_with_dropout_off(bm):
    plan = bm.make_plan(False)
    opts = bm.model_options("hybrid", plan, backbone="gru")
    assert opts["embed_dim"] == opts["hidden_size"] == 256 and opts["dropout"] == 0.0
    assert (opts["num_layers"], opts["attention_every"], opts["window_size"]) == (6, 3, 60)
    assert opts["backbone"] == "gru" and opts["use_sliding_window"]
    assert set(bm.builtin_backbones()) <= set(hs.list_backbones())
    assert bm.keep({"hybrid"}, "hybrid", "hybrid[gru]") and bm.keep({"hybrid[gru]"}, "hybrid", "hybrid[gru]")
    assert not bm.keep({"gated_ssm"}, "hybrid", "hybrid[gated_ssm]")


def test_quick_run_tables(bm, tmp_path, capsys):
    out = tmp_path / "bench.md"
    threads = torch.get_num_threads()
    try:
        raw = bm.main(["--quick", "--only", "gated_ssm,hybrid", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report = out.read_text()
    assert report.strip() == raw["report"].strip()
    assert json.loads((tmp_path / "bench.json").read_text())["quick"] is True
    tables = [block for block in report.split("\n\n") if block.startswith("|")]
    assert len(tables) == 3
    models, hybrid, latency = ([line for line in t.splitlines()] for t in tables)
    # header + rule + gated_ssm, hybrid + their two encoders (2 and 6 layers)
    assert len(models) == 2 + 4 and all(line.count("|") == 10 for line in models)
    assert {line.split("|")[1].strip() for line in models[2:4]} == {"gated_ssm", "hybrid"}
    backbones = [b for b in hs.list_backbones() if hs.backbones.get_backbone(b).builtin]
    assert len(hybrid) == 2 + len(backbones) + 1 and all(line.count("|") == 12 for line in hybrid)
    for line in hybrid[2:-1]:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert cells[4] in {"pass", "FAIL", "FAIL*"} and cells[8] in {"pass", "FAIL", "FAIL*"}
    assert len(latency) == 2 + 2 + len(backbones)
    assert "GFLOP/s" in report and "threads 1" in report
    assert "gated_ssm" in capsys.readouterr().out
