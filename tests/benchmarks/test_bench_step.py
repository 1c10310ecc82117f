"""The step benchmark's harness (:func:`hybridssm.bench.bench_steps`) and ``benchmarks/bench_step.py``:
smoke runs on tiny models, checking the table's columns and that every ratio comes from the
measured values in its row (never the speed)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

import hybridssm as hs
from helpers import benchmark_script
from hybridssm.bench import (
    EXP_ELEMENTS,
    WINDOW,
    BenchSettings,
    StepBench,
    attended_cache_bytes,
    bench_steps,
    format_ceiling_table,
    format_step_table,
    machine_rates,
    param_bytes,
    percent,
    stream_bytes,
)
from hybridssm.bench import steps as steps_module

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


def test_attended_cache_bytes_follow_each_row():
    model = _model("hybrid", attention_every=2, use_sliding_window=False)  # full attention, layer 1
    _, state = model(torch.randn(2, 9, 6), return_state=True, max_len=32)
    state.layers[1].pos.copy_(torch.tensor([3, 40]))  # a row just reset, a row past the buffer
    assert attended_cache_bytes(state) == 2 * 8 * 4 * 2 * (4 + 32)


def test_stream_bytes_read_and_write_the_recurrent_state_and_read_the_cache():
    model = _model("hybrid", attention_every=2, use_sliding_window=False)  # mamba, then attention
    _, state = model(torch.randn(3, 9, 6), return_state=True, max_len=32)
    d_inner = 2 * TINY["hidden_size"]  # expand 2; conv window 4 - 1, state_size 16 (the defaults)
    recurrent = 3 * (d_inner * 3 * 4 + d_inner * 16 * 4 + 8)  # conv, ssm (fp32), the model's pos (int64)
    assert stream_bytes(state) == 2 * recurrent + attended_cache_bytes(state)
    assert attended_cache_bytes(state) == 3 * 2 * 2 * 8 * 4 * 10


def test_machine_rates_measure_the_read_rate():
    rates = machine_rates(seconds=0.02)
    assert set(rates) == {"gemm_gflops", "exp_gelems", "read_gbs"} and rates["read_gbs"] > 0


def test_gemv_reader_reads_every_value_through_the_step_gemv():
    """The second read of the read rate goes through the batch-1 steps' GEMV of weights read from
    memory: its result is each 1,024-value row's sum, so every value of the buffer was read."""
    buf = torch.randn(64 * 1024)
    read = steps_module.gemv_reader(buf)
    assert read is not None
    torch.testing.assert_close(read().view(-1), buf.view(-1, 1024).sum(1), rtol=1e-5, atol=1e-4)
    for bad in (torch.ones(1000), torch.ones(1024, dtype=torch.float64)):  # not [n, 1024] fp32
        assert steps_module.gemv_reader(bad) is None


def test_bench_steps_rows_and_ratios():
    models = {"mamba": _model("mamba"),
              "hybrid": _model("hybrid", attention_every=2, use_sliding_window=False),  # full attention
              "hymba": _model("hymba", num_meta_tokens=2)}
    rates = {"read_gbs": 7.0, "gemm_gflops": 11.0, "exp_gelems": 3.0}  # any values: the ratios follow them
    rows = bench_steps(models, rates, QUICK)
    assert [r["model"] for r in rows] == list(models)
    one = rows[0]["read_gbs_1"] * 1e9  # timed in the batch-1 rounds (on CPU), the same for every row
    assert one > 0 and one != 7e9 and all(r["read_gbs_1"] * 1e9 == one for r in rows)
    for r, model in zip(rows, models.values()):
        assert r["weights_mb"] == param_bytes(model) / 1e6
        assert r["bar_ms"] == pytest.approx((r["weights_mb"] + r["cache_mb"]) * 1e6 / one * 1e3)
        assert r["step_bar"] == pytest.approx(r["step_ms"] / r["bar_ms"])
        assert r["window_step"] == pytest.approx(r["window_ms"] / r["step_ms"])
        for b in QUICK.batches:
            assert r[f"flops_{b}"] > 0 and r[f"fps_{b}"] > 0
            gemm = r[f"gemm_gflops_{b}"] * 1e9  # measured between the streams' steps, the same for every row
            assert gemm > 0 and all(other[f"gemm_gflops_{b}"] * 1e9 == gemm for other in rows)
            assert r[f"gemm_{b}"] == pytest.approx(r[f"flops_{b}"] * r[f"fps_{b}"] / gemm)
            assert r[f"trans_{b}"] > 0 and r[f"bytes_{b}"] > 0 and r[f"own_gflops_{b}"] > 0
            # the exp and read rates too: timed between the streams' steps, the same for every row
            exp, read = r[f"exp_gelems_{b}"] * 1e9, r[f"read_gbs_{b}"] * 1e9
            assert exp > 0 and read > 0
            assert all((o[f"exp_gelems_{b}"] * 1e9, o[f"read_gbs_{b}"] * 1e9) == (exp, read) for o in rows)
            parts = r[f"flops_{b}"] / gemm, r[f"trans_{b}"] / exp, r[f"bytes_{b}"] / read
            assert [r[f"ideal_{k}_s_{b}"] for k in ("gemm", "exp", "mem")] == pytest.approx(parts)
            assert r[f"machine_{b}"] == pytest.approx(sum(parts) * r[f"fps_{b}"])
            own = r[f"flops_{b}"] * r[f"fps_{b}"] / (r[f"own_gflops_{b}"] * 1e9)
            assert r[f"own_{b}"] == pytest.approx(own)
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
    ceiling = format_ceiling_table(rows, QUICK.batches).splitlines()
    assert ceiling[0] == ("| model | of machine B=3 | of machine B=5 | own-shape GEMM B=3 GFLOP/s (of it) "
                          "| own-shape GEMM B=5 GFLOP/s (of it) | ideal µs/frame B=5: GEMM + exp + memory |")
    assert len(ceiling) == 2 + len(models) and all(line.count("|") == 7 for line in ceiling)
    r = rows[0]
    parts = [r[f"ideal_{k}_s_5"] * 1e6 for k in ("gemm", "exp", "mem")]
    assert ceiling[2] == (f"| mamba | {percent(r['machine_3'])} | {percent(r['machine_5'])} "
                          f"| {r['own_gflops_3']:.1f} ({percent(r['own_3'])}) "
                          f"| {r['own_gflops_5']:.1f} ({percent(r['own_5'])}) "
                          f"| {sum(parts):.2f} = {parts[0]:.2f} + {parts[1]:.2f} + {parts[2]:.2f} |")


def test_batch_one_step_window_and_read_share_the_rounds(monkeypatch):
    """The batch-1 step, the window it is compared with and the read rate of its bar are timed in
    the same rounds (each round, each model in turn: one read, its share of the steps, its share of
    the window calls), so that a ratio never divides timings taken minutes apart; the window's
    calls total ``max_iters``; the bar divides by the read rate those rounds timed."""
    events: list[tuple[str, str]] = []
    models = {"a": _model("mamba"), "b": _model("mamba2")}
    for label, m in models.items():
        step, forward = m.step, m.forward

        def recorded_step(*args, _label=label, _step=step, **kwargs):
            events.append((_label, "step"))
            return _step(*args, **kwargs)

        def recorded_forward(x, *args, _label=label, _forward=forward, **kwargs):
            if not kwargs.get("return_state"):  # the prefill that builds the state is not timed
                events.append((_label, "window"))
            return _forward(x, *args, **kwargs)

        monkeypatch.setattr(m, "step", recorded_step)
        monkeypatch.setattr(m, "forward", recorded_forward)
    real_read = steps_module._MachineTurns.read
    reads: dict[str, list[float]] = {"read": [], "gemv_read": []}

    def recorded_read(self):
        events.append(("-", "read"))
        real_read(self)
        for k, v in reads.items():
            v.append(self.times[k][-1])

    monkeypatch.setattr(steps_module._MachineTurns, "read", recorded_read)
    plan = StepBench(steps=4, rounds=2, warmup=1, batches=(),
                     settings=BenchSettings(warmup=1, max_time=100.0, max_iters=4))
    rows = bench_steps(models, {"read_gbs": 1.0, "gemm_gflops": 1.0, "exp_gelems": 1.0}, plan)
    warm = [("a", "step"), ("a", "window"), ("b", "step"), ("b", "window")]
    one_round = [e for k in models
                 for e in [("-", "read"), (k, "step"), (k, "step"), (k, "window"), (k, "window")]]
    assert events == warm + one_round + one_round
    # the faster of the two single-thread reads: sum's one stream, the steps' four-stream GEMV
    sum_read, gemv_read = (steps_module.READ_MIB * 2**20 / statistics.median(reads[k]) for k in reads)
    read = max(sum_read, gemv_read)
    for r in rows:
        assert r["read_gbs_1"] * 1e9 == pytest.approx(read)
        assert (r["sum_read_gbs_1"] * 1e9, r["gemv_read_gbs_1"] * 1e9) == pytest.approx((sum_read, gemv_read))
        assert r["bar_ms"] == pytest.approx((r["weights_mb"] + r["cache_mb"]) * 1e6 / read * 1e3)
        assert r["window_step"] == pytest.approx(r["window_ms"] / r["step_ms"])


def test_stream_ceilings_follow_the_rates_and_the_products_rate(monkeypatch):
    """With the own-shape GEMM rate given and the machine's rates timed between the steps, every
    fraction is the row's measured frames/s times its counted work over them."""
    monkeypatch.setattr(steps_module, "products_rate", lambda products, seconds, device, cache: 5.0)
    rates = {"read_gbs": 2.0, "gemm_gflops": 4.0, "exp_gelems": 0.5}
    plan = StepBench(steps=2, rounds=1, warmup=1, window=False, batches=(4,), settings=QUICK.settings)
    (r,) = bench_steps({"mamba": _model("mamba")}, rates, plan)
    fps = r["fps_4"]
    assert r["own_gflops_4"] == 5.0 and r["own_4"] == pytest.approx(r["flops_4"] * fps / 5e9)
    ideal = (r["flops_4"] / (r["gemm_gflops_4"] * 1e9) + r["trans_4"] / (r["exp_gelems_4"] * 1e9)
             + r["bytes_4"] / (r["read_gbs_4"] * 1e9))
    assert r["machine_4"] == pytest.approx(ideal * fps) and r["machine_4"] > r["gemm_4"]


def test_machine_rates_are_timed_between_the_streams_steps(monkeypatch):
    """The GEMM, exp and read rates of a batch's fractions are timed in the same interleaved loop as
    the models' steps at that batch (not the rates measured once before the rows, which the
    machine's load can move by a third within minutes): each turn the ``gemm_size``^3 product and
    the exp one untimed call then one timed, the read one timed call."""
    real = steps_module.time_interleaved
    seen = []
    clock = iter(range(10**6))  # perf_counter as 0, 1, 2, ...: each timed call lasts one "second"

    def timed(fns, settings, device):
        if steps_module._MACHINE not in fns:
            return real(fns, settings, device)
        # the streams' loop: the machine's turn among the models' steps; its timed calls take 1 s,
        # then (second batch) 1/2 s against a fake clock
        seen.append(sorted(k for k in fns if k is not steps_module._MACHINE))
        calls = {"mm": 0, "exp": 0}

        def count(name):
            def fn(*args, **kwargs):
                calls[name] += 1
            return fn

        with monkeypatch.context() as m:
            m.setattr(steps_module.time, "perf_counter", lambda: next(clock) / len(seen))
            m.setattr(steps_module.torch, "mm", count("mm"))
            m.setattr(steps_module.torch, "exp", count("exp"))
            for _ in range(3):
                fns[steps_module._MACHINE]()
        assert calls == {"mm": 6, "exp": 6}  # each turn: one untimed call (operands back in cache), one timed
        return real({k: f for k, f in fns.items() if k is not steps_module._MACHINE}, settings, device)

    monkeypatch.setattr(steps_module, "time_interleaved", timed)
    plan = StepBench(steps=2, rounds=1, warmup=1, window=False, batches=(2, 3), settings=QUICK.settings,
                     gemm_seconds=0.001, gemm_size=64)
    rows = bench_steps({"a": _model("mamba"), "b": _model("mamba2")}, {"read_gbs": 99.0, "gemm_gflops": 99.0,
                                                                       "exp_gelems": 99.0}, plan)
    assert seen == [["a", "b"], ["a", "b"]]  # one loop per batch, both models in it
    threads = torch.get_num_threads()  # exp is timed on one thread and counts for each (exp_rate's rule)
    read = steps_module.READ_MIB * 2**20
    for r in rows:
        assert (r["gemm_gflops_2"], r["gemm_gflops_3"]) == pytest.approx((2 * 64**3 / 1e9, 4 * 64**3 / 1e9))
        assert (r["exp_gelems_2"], r["exp_gelems_3"]) == pytest.approx(
            (threads * EXP_ELEMENTS / 1e9, 2 * threads * EXP_ELEMENTS / 1e9))
        assert (r["read_gbs_2"], r["read_gbs_3"]) == pytest.approx((read / 1e9, 2 * read / 1e9))
        assert r["gemm_3"] == pytest.approx(r["flops_3"] * r["fps_3"] / (4 * 64**3))
        assert r["ideal_gemm_s_2"] == pytest.approx(r["flops_2"] / (2 * 64**3))
        assert r["ideal_exp_s_3"] == pytest.approx(r["trans_3"] / (2 * threads * EXP_ELEMENTS))
        assert r["ideal_mem_s_3"] == pytest.approx(r["bytes_3"] / (2 * read))


def test_stream_flops_are_the_step_products():
    """A stream's matmul FLOPs per frame: every projection once (2 * in * out) plus the SSM's readout
    ``C . h`` (2 * d_inner * N, a batched product), whatever the batch."""
    model = _model("mamba", num_layers=1)
    rows = bench_steps({"m": model}, {"read_gbs": 1.0, "gemm_gflops": 1.0, "exp_gelems": 1.0},
                       StepBench(steps=2, rounds=1, warmup=1, window=False, batches=(1, 4),
                                 settings=QUICK.settings, gemm_seconds=0.001))
    linears = sum(2 * m.in_features * m.out_features for m in model.modules()
                  if isinstance(m, torch.nn.Linear))
    d_inner, n = 2 * TINY["hidden_size"], 16  # expand 2, state_size 16 (the defaults)
    readout = 2 * d_inner * n
    assert rows[0]["flops_1"] == rows[0]["flops_4"] == linears + readout
    assert rows[0]["window_ms"] is None and "—" in format_step_table(rows, (1, 4))
    # per frame: silu of the conv output and of the gate, softplus of dt (2 exps), the decays
    # exp(dt A); A = -exp(A_log) once per step, shared by the batch
    for b in (1, 4):
        assert rows[0][f"trans_{b}"] == 2 * d_inner + 2 * d_inner + d_inner * n + d_inner * n / b
        assert rows[0][f"bytes_{b}"] == 2 * (d_inner * 3 * 4 + d_inner * n * 4 + 8)  # read and written


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
    assert "threads 1" in text and "single-thread read" in text and "exp rate in cache" in text
    rate = json.loads(raw.read_text())["rows"][0]["gemm_gflops_2"]  # the fractions' denominator
    assert rate > 0 and f"then one timed: hot; median): B=2 {rate:.1f} GFLOP/s." in text
    assert "| model | of machine B=2 | own-shape GEMM B=2 GFLOP/s (of it) |" in text
    record = json.loads(raw.read_text())
    assert [r["model"] for r in record["rows"]] == ["mamba", "hybrid[gru]"]
    assert {"read_gbs", "gemm_gflops"} <= set(record["rates"])
    for r in record["rows"]:
        assert text.count(f"| {r['model']} | ") == 2 and r["fps_2"] > 0
        assert r["machine_2"] > 0 and r["own_2"] > 0 and r["trans_2"] > 0


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
