"""The step benchmark's harness (:func:`hybridssm.bench.bench_steps`) and ``benchmarks/bench_step.py``:
smoke runs on tiny models, checking the table's columns and that every ratio comes from the
measured values in its row (never the speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hybridssm as hs
from helpers import benchmark_script
from hybridssm.bench import (
    WINDOW,
    BenchSettings,
    StepBench,
    attended_cache_bytes,
    bench_steps,
    format_step_table,
    machine_rates,
    param_bytes,
)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_step.py"
TINY = dict(embed_dim=6, hidden_size=16, num_layers=2, num_heads=2, head_dim=8, dropout=0.0)
QUICK = StepBench(steps=6, rounds=2, warmup=1, batches=(3, 5),
                  settings=BenchSettings(warmup=1, max_time=0.01, max_iters=2))


def _model(name: str, **opts) -> torch.nn.Module:
    fields = set(hs.get_config_class(name).option_names())
    return hs.build(name, **{k: v for k, v in {**TINY, **opts}.items() if k in fields}).eval()


def test_param_bytes_counts_every_parameter():
    model = _model("mamba")
    assert param_bytes(model) == 4 * hs.param_count("mamba", **{k: v for k, v in TINY.items()
                                                                if k not in ("num_heads", "head_dim")})


@pytest.mark.parametrize("window", [None, 4])
def test_attended_cache_bytes_follow_the_filled_slots(window):
    opts = dict(attention_every=2, use_sliding_window=window is not None, window_size=window or 60)
    model = _model("hybrid", **opts)  # one attention layer (layer 1)
    per_slot = 2 * 2 * 8 * 4  # k and v, 2 heads x 8 wide, fp32; batch 1
    assert attended_cache_bytes(model.init_state(1, max_len=32)) == per_slot  # the first key
    _, state = model(torch.randn(1, 9, 6), return_state=True, max_len=32)
    filled = 10 if window is None else window  # the next step attends 9 + itself, or the full ring
    assert attended_cache_bytes(state) == per_slot * filled


def test_attended_cache_bytes_count_hymba_prefix():
    model = _model("hymba", num_meta_tokens=3)  # two full-attention layers, 3 meta slots each
    per_slot = 2 * 2 * 8 * 4
    assert attended_cache_bytes(model.init_state(1, max_len=16)) == 2 * per_slot * (3 + 1)


def test_machine_rates_measure_the_read_rate():
    rates = machine_rates(seconds=0.02)
    assert set(rates) == {"gemm_gflops", "exp_gelems", "read_gbs"} and rates["read_gbs"] > 0


def test_bench_steps_rows_and_ratios():
    models = {"mamba": _model("mamba"),
              "hybrid": _model("hybrid", attention_every=2, use_sliding_window=False),  # full attention
              "hymba": _model("hymba", num_meta_tokens=2)}
    rates = {"read_gbs": 7.0, "gemm_gflops": 11.0}  # any values: the ratios must follow them
    rows = bench_steps(models, rates, QUICK)
    assert [r["model"] for r in rows] == list(models)
    for r, model in zip(rows, models.values()):
        assert r["weights_mb"] == param_bytes(model) / 1e6
        assert r["bar_ms"] == pytest.approx((r["weights_mb"] + r["cache_mb"]) * 1e6 / 7e9 * 1e3)
        assert r["step_bar"] == pytest.approx(r["step_ms"] / r["bar_ms"])
        assert r["window_step"] == pytest.approx(r["window_ms"] / r["step_ms"])
        for b in QUICK.batches:
            assert r[f"flops_{b}"] > 0 and r[f"fps_{b}"] > 0
            assert r[f"gemm_{b}"] == pytest.approx(r[f"flops_{b}"] * r[f"fps_{b}"] / 11e9)
    assert rows[0]["cache_mb"] == 0  # no attention in mamba
    # the attended span: WINDOW frames of history, then the timed steps of a round (and the new key)
    per_slot = 2 * 2 * 8 * 4 / 1e6
    span = WINDOW + 1, WINDOW + QUICK.steps // QUICK.rounds + 1
    assert rows[1]["cache_mb"] == pytest.approx(per_slot * sum(span) / 2)
    table = format_step_table(rows, QUICK.batches)
    lines = table.splitlines()
    assert lines[0] == ("| model | weights MB | bar ms | step ms (B=1) | step / bar | window ms (60 frames) "
                        "| window / step | frames/s B=3 (of GEMM) | frames/s B=5 (of GEMM) |")
    assert len(lines) == 2 + len(models) and all(line.count("|") == 10 for line in lines)


def test_stream_flops_are_the_step_products():
    """A stream's matmul FLOPs per frame: every projection once (2 * in * out) plus the SSM's readout
    ``C . h`` (2 * d_inner * N, a batched product), whatever the batch."""
    model = _model("mamba", num_layers=1)
    rows = bench_steps({"m": model}, {"read_gbs": 1.0, "gemm_gflops": 1.0},
                       StepBench(steps=2, rounds=1, warmup=1, window=False, batches=(1, 4),
                                 settings=QUICK.settings))
    linears = sum(2 * m.in_features * m.out_features for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    readout = 2 * (2 * TINY["hidden_size"]) * 16  # expand 2, state_size 16 (the defaults)
    assert rows[0]["flops_1"] == rows[0]["flops_4"] == linears + readout
    assert rows[0]["window_ms"] is None and "—" in format_step_table(rows, (1, 4))


@pytest.fixture
def script():
    with benchmark_script("bench_step") as module:
        yield module


def test_quick_run_writes_table_and_json(script, tmp_path):
    out, raw = tmp_path / "step.md", tmp_path / "step.json"
    threads = torch.get_num_threads()
    try:
        text = script.main(["--quick", "--only", "mamba,hybrid[gru]", "--steps", "4", "--rounds", "2",
                            "--batches", "2", "--out", str(out), "--json", str(raw)])
    finally:
        torch.set_num_threads(threads)
    assert out.read_text().strip() == text.strip()
    assert "threads 1" in text and "single-thread read" in text
    record = json.loads(raw.read_text())
    assert [r["model"] for r in record["rows"]] == ["mamba", "hybrid[gru]"]
    assert {"read_gbs", "gemm_gflops"} <= set(record["rates"])
    for r in record["rows"]:
        assert f"| {r['model']} | " in text and r["fps_2"] > 0


@pytest.mark.slow  # two subprocesses importing torch
def test_against_another_checkout_uses_this_harness(script, tmp_path, monkeypatch):
    """``--against SRC`` times SRC's models with this checkout's harness, even where SRC's
    ``hybridssm`` has no (or another) ``hybridssm.bench``."""
    import shutil

    other = tmp_path / "src"
    shutil.copytree(SCRIPT.parents[1] / "src" / "hybridssm", other / "hybridssm",
                    ignore=shutil.ignore_patterns("bench", "__pycache__"))
    monkeypatch.setenv("HYBRIDSSM_KERNELS", "torch")  # no kernel builds for the copy
    text = script.main(["--against", str(other), "--repeats", "1", "--steps", "2", "--rounds", "1",
                        "--only", "gated_ssm"])
    lines = text.splitlines()
    assert lines[-3:-1] == ["| model | A ms | B ms | A / B |", "|---|---|---|---|"] and lines[-4] == ""
    assert lines[-1].startswith("| gated_ssm | ") and lines[-1].endswith("x |")
