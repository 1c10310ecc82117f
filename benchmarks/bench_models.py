"""Every model at the seeds' defaults, and ``hybrid`` with every built-in backbone, beside
``nn.TransformerEncoder`` (DESIGN §5's protocol, measured with :mod:`hybridssm.bench`).

    PYTHONPATH=src python benchmarks/bench_models.py [--quick] [--out FILE] [--threads 2]
        [--step-threads 1] [--only NAMES] [--profile LABEL --profile-shape B,T]

Tables (markdown):

1. Models at the seeds' defaults (``recommended_defaults``, ``embed_dim = hidden_size = 256``,
   dropout 0 for timing), short shape (B=32, T=60): forward+backward and forward tokens/s, each
   as a ratio to the encoder of the model's width, heads and layers; the fraction of the GEMM
   ceiling they reach.
2. ``hybrid`` per backbone (hidden 256, 6 layers, attention every 3rd, sliding window 60,
   dropout 0): forward+backward tokens/s at (32, 60) and (4, 2048) beside the 6-layer, 4-head
   encoder, with the issue's floors (>= 0.5x the encoder at T=60, > 1x at T=2048) and peak memory
   of the T=2048 rows, each in its own subprocess.
3. Step latency at batch 1 (``inplace=True``) beside re-running the 60-frame window.

Timing: 2 warm-up iterations (the second counts matmul FLOPs), then repeat until 3 s or 20
iterations, median; the rows of one table and shape are interleaved in one process. A row whose
first iteration runs past ``--slow-limit`` (30 s) is stopped: "—*". GEMM ceiling:
``FlopCounterMode``'s fwd+bwd matmul FLOPs / the measured 512^3 fp32 GEMM rate, over the measured
time. ``--only`` keeps rows by model name (``hybrid`` keeps every backbone) or label
(``hybrid[gru]``); ``--profile LABEL`` prints ``torch.profiler``'s top ops of one forward+backward
instead of the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import hybridssm as hs
from hybridssm.backbones import get_backbone
from hybridssm.bench import (
    BenchSettings,
    baseline_for,
    ceiling_fraction,
    cell,
    command_line,
    input_size,
    machine_line,
    machine_rates,
    markdown_table,
    measure_modules,
    peak_memory,
    percent,
    ratio,
    step_latency,
    timing_line,
    top_ops,
    window_latency,
    workloads,
)

MODELS = ["ss_transformer", "hymba", "hybrid", "mamba", "mamba2", "gated_ssm", "transformer"]
FLOOR_SHORT, FLOOR_LONG = 0.5, 1.0  # the targets for every hybrid backbone (floors)
WINDOW = 60  # the seeds' real-time window (frames)


@dataclass
class Plan:
    """Sizes and iteration counts: the full protocol, or ``--quick``'s smoke test."""

    width: int = 256
    short: tuple[int, int] = (32, 60)
    long: tuple[int, int] = (4, 2048)
    settings: BenchSettings = field(default_factory=BenchSettings)
    memory: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)


def make_plan(quick: bool) -> Plan:
    if not quick:
        return Plan()
    # Tiny sizes, same code paths: width 32, 8-wide attention heads, few iterations, no memory.
    return Plan(width=32, short=(4, 16), long=(2, 32), memory=False, overrides={"head_dim": 8},
                settings=BenchSettings.quick())


def model_options(name: str, plan: Plan, **extra: Any) -> dict[str, Any]:
    """The seeds' defaults of ``name`` at ``embed_dim = hidden_size = width``, dropout 0."""
    opts = {**hs.recommended_defaults(name), **extra}
    opts.update(embed_dim=plan.width, hidden_size=plan.width, dropout=0.0)
    for key, value in plan.overrides.items():
        if key in opts:
            opts[key] = value
    return opts


def builtin_backbones() -> list[str]:
    return [b for b in hs.list_backbones() if get_backbone(b).builtin]


def keep(only: set[str] | None, model: str, label: str) -> bool:
    return only is None or model in only or label in only


# -- measuring --------------------------------------------------------------------------------------
@dataclass
class Row:
    label: str
    model: str
    options: dict[str, Any] | None  # None: the encoder baseline
    module: nn.Module
    extra: dict[str, Any] = field(default_factory=dict)


def baseline_label(m: nn.Module) -> str:
    enc = m.encoder
    return (f"nn.TransformerEncoder ({enc.num_layers} layers, {enc.layers[0].self_attn.num_heads} heads, "
            f"d={m.hidden_size})")


def measure(rows: list[Row], shape: tuple[int, int], plan: Plan, slow_limit: float,
            forward: bool) -> dict[str, dict[str, Any]]:
    """:func:`hybridssm.bench.measure_modules` of every row at ``shape``, interleaved: tokens/s,
    matmul FLOPs, and ``too_slow`` for a row whose first forward+backward ran past ``slow_limit``."""
    B, T = shape
    torch.manual_seed(0)
    x = torch.randn(B, T, input_size(rows[0].module))
    return measure_modules({r.label: r.module for r in rows}, x, plan.settings, slow_limit=slow_limit,
                           forward=forward)


# -- formatting -------------------------------------------------------------------------------------
def verdict(ratio: float | None, floor: float, strict: bool) -> str:
    if ratio is None:
        return "—"
    ok = ratio > floor if strict else ratio >= floor
    return "pass" if ok else "FAIL"


# -- the three tables -------------------------------------------------------------------------------
def models_table(plan: Plan, only: set[str] | None, rates: dict[str, float], slow_limit: float,
                 raw: dict[str, Any]) -> str | None:
    names = [m for m in MODELS if keep(only, m, m)]
    if not names:
        return None
    rows, base_of, bases = [], {}, {}
    for name in names:
        torch.manual_seed(0)
        opts = model_options(name, plan)
        model = hs.build(name, **opts)
        rows.append(Row(name, name, opts, model))
        base = baseline_for(model)
        key = baseline_label(base)
        bases.setdefault(key, Row(key, "baseline", None, base))
        base_of[name] = key
    res = measure(rows + list(bases.values()), plan.short, plan, slow_limit, forward=True)
    lines = []
    for r in rows + list(bases.values()):
        m = res[r.label]
        b = res[base_of.get(r.label, r.label)]
        fb_ratio = ratio(m["fwd_bwd_tok_s"], b["fwd_bwd_tok_s"])
        fw_ratio = ratio(m["fwd_tok_s"], b["fwd_tok_s"])
        m.update(ratio_fwd_bwd=fb_ratio, ratio_fwd=fw_ratio,
                 gemm_fraction=ceiling_fraction(m["fwd_bwd_s"], rates, m["flops"]),
                 baseline=base_of.get(r.label), options=r.options,
                 params=sum(p.numel() for p in r.module.parameters()))
        layers = r.options["num_layers"] if r.options else r.module.encoder.num_layers
        lines.append([
            r.label if r.options else f"*{r.label}*", str(layers), f"{m['params']:,}",
            cell(m["fwd_bwd_tok_s"], ",.0f") + "*" * m["too_slow"], cell(fb_ratio, ".2f", "x"),
            cell(m["fwd_tok_s"], ",.0f"), cell(fw_ratio, ".2f", "x"),
            cell(m["flops"] and m["flops"] / 1e9, ".2f"), percent(m["gemm_fraction"]),
        ])
    raw["models"] = {"shape": plan.short, "rows": res}
    B, T = plan.short
    return markdown_table(["model", "layers", "params", f"fwd+bwd tok/s (B={B}, T={T})", "vs encoder",
                  "fwd tok/s", "vs encoder", "fwd+bwd matmul GFLOP", "of GEMM ceiling"], lines)


def hybrid_table(plan: Plan, only: set[str] | None, rates: dict[str, float], slow_limit: float,
                 raw: dict[str, Any], notes: list[str]) -> str | None:
    rows = []
    for bb in builtin_backbones():
        label = f"hybrid[{bb}]"
        if keep(only, "hybrid", label):
            torch.manual_seed(0)
            opts = model_options("hybrid", plan, backbone=bb)
            rows.append(Row(label, "hybrid", opts, hs.build("hybrid", **opts)))
    if not rows:
        return None
    base = baseline_for(rows[0].module)
    base_row = Row(baseline_label(base), "baseline", None, base)
    per_shape = {}
    for shape in (plan.short, plan.long):
        per_shape[shape] = measure(rows + [base_row], shape, plan, slow_limit, forward=False)
    mem: dict[str, float | None] = {}
    if plan.memory:  # only rows that finished an iteration in time
        for r in rows + [base_row]:
            first = per_shape[plan.long][r.label]
            if first["too_slow"]:
                continue
            opts = r.options if r.options else rows[0].options
            mem[r.label] = peak_memory("hybrid", opts, plan.long, baseline=r.options is None,
                                       threads=torch.get_num_threads(),
                                       timeout=max(120.0, 4 * first["first_s"]))
    lines = []
    for r in rows + [base_row]:
        params = sum(p.numel() for p in r.module.parameters())
        line = [r.label if r.options else f"*{r.label}*", f"{params:,}"]
        for shape, floor, strict in ((plan.short, FLOOR_SHORT, False), (plan.long, FLOOR_LONG, True)):
            res = per_shape[shape]
            m, b = res[r.label], res[base_row.label]
            rel = ratio(m["fwd_bwd_tok_s"], b["fwd_bwd_tok_s"])
            m.update(ratio_fwd_bwd=rel, gemm_fraction=ceiling_fraction(m["fwd_bwd_s"], rates, m["flops"]),
                     options=r.options,
                     peak_mib=mem.get(r.label) if shape == plan.long else None)
            line += [cell(m["fwd_bwd_tok_s"], ",.0f") + "*" * m["too_slow"], cell(rel, ".2f", "x"),
                     (verdict(rel, floor, strict) if not m["too_slow"] else "FAIL*") if r.options else "",
                     percent(m["gemm_fraction"])]
        line.append(cell(mem.get(r.label), ",.0f"))
        lines.append(line)
    if not plan.memory:
        notes.append("Peak memory skipped (--quick).")
    raw["hybrid"] = {str(s): v for s, v in per_shape.items()}
    (B1, T1), (B2, T2) = plan.short, plan.long
    return markdown_table(["backbone", "params",
                  f"fwd+bwd tok/s ({B1}, {T1})", "vs encoder", f">= {FLOOR_SHORT}x", "of GEMM ceiling",
                  f"fwd+bwd tok/s ({B2}, {T2})", "vs encoder", f"> {FLOOR_LONG}x", "of GEMM ceiling",
                  f"peak MiB ({B2}, {T2})"], lines)


def latency_table(plan: Plan, only: set[str] | None, raw: dict[str, Any], step_threads: int) -> str | None:
    specs = [(m, m, model_options(m, plan)) for m in MODELS if keep(only, m, m)]
    specs += [(f"hybrid[{bb}]", "hybrid", model_options("hybrid", plan, backbone=bb))
              for bb in builtin_backbones() if keep(only, "hybrid", f"hybrid[{bb}]")]
    if not specs:
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(step_threads)
    lines, res = [], {}
    try:
        for label, name, opts in specs:
            torch.manual_seed(0)
            model = hs.build(name, **opts).eval()
            step = step_latency(model, plan.settings)
            window = window_latency(model, WINDOW, plan.settings)
            res[label] = {"step_ms": step * 1e3, "window_ms": window * 1e3}
            lines.append([label, cell(step * 1e3, ".3f"), cell(window * 1e3, ".3f"),
                          cell(window / step, ".1f", "x")])
    finally:
        torch.set_num_threads(threads)
    raw["latency"] = {"threads": step_threads, "rows": res}
    return markdown_table(["model", "step ms (B=1, inplace)", f"re-run {WINDOW}-frame window ms (B=1)",
                  "window / step"], lines)


# -- entry point ------------------------------------------------------------------------------------
def _shape_rows(raw: dict[str, Any], section: str) -> list[dict[str, Any]]:
    if section not in raw:
        return []
    if section == "models":
        return [raw["models"]["rows"]]
    return list(raw[section].values())


def profile(label: str, shape: tuple[int, int], plan: Plan) -> str:
    """``torch.profiler``'s top ops (self CPU time) of one forward+backward of ``label``
    (``mamba``, ``hybrid[gru]``, ...), after one warm-up."""
    if label.startswith("hybrid[") and label.endswith("]"):
        opts = model_options("hybrid", plan, backbone=label[7:-1])
        model = hs.build("hybrid", **opts)
    else:
        model = hs.build(label, **model_options(label, plan))
    x = torch.randn(*shape, model.config.embed_dim)
    return top_ops(workloads(model.train(), x)[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, few iterations (smoke test)")
    ap.add_argument("--out", help="also write the tables to FILE and the raw numbers to FILE's .json")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for throughput (default 2)")
    ap.add_argument("--step-threads", type=int, default=1,
                    help="intra-op threads for batch-1 step latency (default 1)")
    ap.add_argument("--only", help="comma list of model names or labels (hybrid[gru]) to keep")
    ap.add_argument("--slow-limit", type=float, default=30.0,
                    help="seconds: leave out a row whose first iteration takes longer (default 30)")
    ap.add_argument("--profile", metavar="LABEL", help="print the top ops of one fwd+bwd of LABEL")
    ap.add_argument("--profile-shape", default="4,2048", help="B,T for --profile (default 4,2048)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = make_plan(args.quick)
    kernels = hs.kernels(build=True)  # builds the fused kernels now: never inside a timed (alarmed) iteration
    if args.profile:
        B, T = (int(v) for v in args.profile_shape.split(","))
        text = profile(args.profile, (B, T), plan)
        print(text)
        return {"profile": text}
    only = {s.strip() for s in args.only.split(",")} if args.only else None
    start = time.perf_counter()
    load0 = os.getloadavg()
    rates = machine_rates("cpu", seconds=0.1 if args.quick else 0.5)
    command = command_line("benchmarks/bench_models.py", argv)
    machine = machine_line(rates, f"{args.threads} (step latency: {args.step_threads})", kernels)
    s = plan.settings
    protocol = (f"{timing_line(s)}; dropout 0 in every model for timing; embed_dim = hidden_size "
                f"= {plan.width}. Step latency: batch 1, inplace, median of {s.latency_steps} steps after "
                f"{s.latency_warmup} warm-up. 'of GEMM ceiling' = fwd+bwd matmul FLOPs / GEMM rate / "
                "measured time.")
    raw: dict[str, Any] = {"command": command, "machine": machine, "rates": rates, "threads": args.threads,
                           "quick": args.quick, "settings": s.__dict__ | {"extra_env": dict(s.extra_env)}}
    notes: list[str] = []
    parts = [f"`{command}`", "", machine, "", protocol]
    print("\n".join(parts), flush=True)
    B, T = plan.short
    sections = [
        (f"### Models at the seeds' defaults, (B={B}, T={T})",
         lambda: models_table(plan, only, rates, args.slow_limit, raw)),
        ("### hybrid per backbone (6 layers, attention every 3rd, sliding window 60)",
         lambda: hybrid_table(plan, only, rates, args.slow_limit, raw, notes)),
        (f"### Step latency (batch 1, {args.step_threads} thread{'s' * (args.step_threads > 1)})",
         lambda: latency_table(plan, only, raw, args.step_threads)),
    ]
    for title, build_table in sections:
        text = build_table()
        if text is not None:
            parts += ["", title, "", text]
            print("\n".join(["", title, "", text]), flush=True)
    slow = sorted({label for sec in ("models", "hybrid") for shape_rows in _shape_rows(raw, sec)
                   for label, r in shape_rows.items() if r["too_slow"]})
    if slow:
        notes.append(f"\\* stopped: the first forward+backward of {', '.join(slow)} at the shape marked "
                     f"was still running after {args.slow_limit:.0f} s (DESIGN §5: a path slower than "
                     "~30 s per iteration shows \"—\"); its target counts as failed.")
    load1 = os.getloadavg()
    elapsed = time.perf_counter() - start
    notes.append(f"Load average at the end {load1[0]:.1f} (other work shares this machine); "
                 f"total {elapsed:.0f} s.")
    parts += [""] + notes
    print("\n".join([""] + notes), flush=True)
    report = "\n".join(parts)
    raw["elapsed_s"], raw["load_average"] = elapsed, [load0, load1]
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")
        with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
            json.dump(raw, fh, indent=2, default=str)
    raw["report"] = report
    return raw


if __name__ == "__main__":
    main()
