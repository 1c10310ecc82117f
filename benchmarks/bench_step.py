"""Streaming steps of every model: batch-1 latency against the machine's bar and against re-running
the window, and many streams at once against the GEMM and machine ceilings (DESIGN §5; issue 12).

    PYTHONPATH=src python benchmarks/bench_step.py [--quick] [--only NAMES] [--steps 1000] [--rounds 5]
        [--threads 1] [--batches 16,64,256] [--out results/bench_step.md] [--json FILE]
        [--against /path/to/other/src --repeats 3]

The models and options are ``bench_models.py``'s step table (the seeds' defaults at width 256,
``hybrid`` with every built-in backbone). Everything runs under ``torch.inference_mode()``
(:func:`hybridssm.bench.bench_steps`):

* step ms: ``model.step(x_t, state, inplace=True)`` at batch 1, from a state that has seen 60
  frames; the models interleaved in ``--rounds`` rounds of ``--steps / --rounds`` steps, medians.
* bar ms: parameter bytes + the attention cache bytes actually attended, over the single-thread
  memory read rate timed in the same rounds (before each model's share: a ``sum`` of 128 MiB, one
  stream, and the steps' own GEMV over the same bytes, four streams; the faster); step / bar.
* window ms: re-running the 60-frame window, ``model(x)`` (the seeds' alternative to a state), its
  calls spread over the same rounds (after each model's steps); window / step. The three timings of
  a row are thus taken in the same minutes: this machine's memory and GEMM rates move apart.
* frames/s at B = 16, 64, 256 streams (a random 1/60 of rows reset each step, as episodes end),
  with its fraction of the GEMM ceiling (matmul FLOPs per frame x frames/s / the 512^3 GEMM rate
  measured between the streams' steps at that B, as they are timed: the header gives each).

A second table sets the streams against the machine (:mod:`hybridssm.bench.steps`): "of machine",
the ideal time (matmul FLOPs / GEMM rate + transcendental elements / exp rate in cache + the bytes of
the recurrent states read and written and of the attended attention cache read, over the read rate;
the three rates timed between the streams' steps, as the GEMM's)
over the measured time; the own-shape GEMM rate (the step's matrix products timed alone at their own
M = B) and the fraction of it; and the ideal time per frame at B = 64 split into those three parts.

``--json`` writes the rates and, per row and batch B: ``fps_B``, ``gemm_B`` (of GEMM), ``machine_B``
(of machine), ``own_gflops_B`` and ``own_B`` (of it), the work per frame ``flops_B``, ``trans_B``
(exp-equivalent elements), ``bytes_B``, the rates timed between the steps ``gemm_gflops_B``,
``exp_gelems_B``, ``read_gbs_B``, and the ideal seconds per frame ``ideal_gemm_s_B``,
``ideal_exp_s_B``, ``ideal_mem_s_B``.

With ``--against SRC`` only the batch-1 step is measured, in subprocesses alternating between this
checkout's ``src`` and ``SRC`` (``--repeats`` times each; both use this checkout's harness), and the
table gives each side's median over its runs and the ratio.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


@functools.cache
def _harness():
    """This checkout's ``hybridssm.bench``, whichever ``hybridssm`` is imported (``--against`` runs it
    over another checkout's models). It is installed as ``hybridssm.bench``, so that
    ``bench_models.py``'s imports find it too."""
    import hybridssm

    package = SRC / "hybridssm" / "bench"
    loaded = sys.modules.get("hybridssm.bench")
    if loaded is not None and Path(loaded.__file__).resolve().parent == package.resolve():
        return loaded
    spec = importlib.util.spec_from_file_location("hybridssm.bench", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its modules import each other (and dataclasses look them up) by name
    spec.loader.exec_module(mod)
    hybridssm.bench = mod
    return mod


def build_models(only: set[str] | None, quick: bool = False) -> dict:
    """``label -> model`` (eval mode) of bench_models.py's step table (``quick``: its tiny sizes)."""
    import torch

    _harness()  # before bench_models.py imports it
    sys.path.insert(0, str(HERE))
    import bench_models as bm

    import hybridssm as hs

    plan = bm.make_plan(quick)
    specs = [(m, m, bm.model_options(m, plan)) for m in bm.MODELS if bm.keep(only, m, m)]
    specs += [(f"hybrid[{bb}]", "hybrid", bm.model_options("hybrid", plan, backbone=bb))
              for bb in bm.builtin_backbones() if bm.keep(only, "hybrid", f"hybrid[{bb}]")]
    models = {}
    for label, name, opts in specs:
        torch.manual_seed(0)
        models[label] = hs.build(name, **opts).eval()
    return models


def measure(args, batches: tuple[int, ...], window: bool) -> tuple[list[dict], dict]:
    import torch

    bench = _harness()
    torch.set_num_threads(args.threads)
    models = build_models(set(args.only.split(",")) if args.only else None, args.quick)
    rates = bench.machine_rates(seconds=0.05 if args.quick else 0.5)
    settings = bench.BenchSettings.quick() if args.quick else bench.BenchSettings()
    plan = bench.StepBench(steps=args.steps, rounds=args.rounds, window=window, batches=batches,
                           warmup=2 if args.quick else 20, settings=settings,
                           gemm_seconds=0.005 if args.quick else 0.1)
    return bench.bench_steps(models, rates, plan), rates


def _child(src: Path, args) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--_child", "--steps", str(args.steps), "--rounds", str(args.rounds),
           "--threads", str(args.threads)] + (["--only", args.only] if args.only else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma list of model names or labels (hybrid[gru]), as bench_models.py")
    p.add_argument("--steps", type=int, default=1000, help="batch-1 steps per model")
    p.add_argument("--rounds", type=int, default=5, help="interleaving rounds of the batch-1 steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny models, few iterations")
    p.add_argument("--batches", default="16,64,256", help="stream counts (comma list; '' for none)")
    p.add_argument("--out", help="write the markdown table (with its header) to this file")
    p.add_argument("--json", help="write the rows and the machine's rates as JSON to this file")
    p.add_argument("--against", help="another checkout's src directory to compare the step with (A/B)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side with --against")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        rows, _ = measure(args, (), window=False)
        print(json.dumps({r["model"]: r["step_ms"] for r in rows}))
        return ""
    bench = _harness()
    t0 = time.time()
    if args.against:
        other = Path(args.against).resolve()
        mine: dict[str, list[float]] = {}
        theirs: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # alternate, so that load drifts hit both sides alike
            for src, acc in ((other, theirs), (SRC, mine)):
                for k, v in _child(src, args).items():
                    acc.setdefault(k, []).append(v)
        lines = [f"# batch-1 step ms (median; {args.threads} thread(s), {args.steps} steps per model "
                 "per run)",
                 "", f"A = {other}, B = {SRC}; each cell: the median over {args.repeats} runs "
                 "(alternating A, B)", ""]
        cells = []
        for k in theirs:
            a, b = statistics.median(theirs[k]), statistics.median(mine.get(k, [float("nan")]))
            cells.append([k, bench.cell(a, ".3f"), bench.cell(b, ".3f"), bench.times(a / b)])
        text = "\n".join(lines + [bench.markdown_table(["model", "A ms", "B ms", "A / B"], cells)])
        print(text)
        return text
    batches = tuple(int(b) for b in args.batches.split(",") if b)
    rows, rates = measure(args, batches, window=True)
    head = [
        bench.machine_line(rates, str(args.threads)),
        "",
        *(["--quick: tiny models and few iterations, a smoke test of every path; its numbers are not "
           "measurements.", ""] if args.quick else []),
        f"Step: batch 1, inplace, under inference_mode, median of {args.steps} steps ({args.rounds} "
        "interleaved rounds) from a state that has seen 60 frames. Bar: (parameter bytes + attended "
        "attention cache bytes) / the single-thread read rate timed in the same rounds"
        + (f" ({rows[0]['read_gbs_1']:.1f} GB/s: the faster of sum over 128 MiB, "
           f"{rows[0]['sum_read_gbs_1']:.1f}, and the step's four-stream GEMV over it, "
           f"{rows[0]['gemv_read_gbs_1']:.1f})" if rows and "gemv_read_gbs_1" in rows[0] else
           f" ({rows[0]['read_gbs_1']:.1f} GB/s)" if rows else "")
        + ". Window: re-running the 60-frame window, model(x), median, its calls in the same rounds. "
        "Streams: step(x, state, reset=done, inplace=True) with a random 1/60 of rows reset per step; "
        "(of GEMM) = matmul FLOPs per frame x frames/s / the 512^3 GEMM rate measured between the "
        "streams' steps (each turn one call to bring its operands back, then one timed: hot; median)"
        + (": " + ", ".join(f"B={b} {rows[0][f'gemm_gflops_{b}']:.1f}" for b in batches) + " GFLOP/s."
           if batches and rows else "."),
        "",
        "",
    ]
    text = "\n".join(head) + bench.format_step_table(rows, batches)
    if batches:
        text += "\n".join([
            "", "", "## Streams against the machine", "",
            "Of machine: ideal time / measured time; ideal = matmul FLOPs / that GEMM rate + transcendental "
            "elements (exp, sigmoid, silu, tanh, softmax, ... in exps; softplus 2) / exp rate in cache + "
            "bytes moved (recurrent states read and written once, attended attention cache read once; "
            "weights, amortised over the batch, left out) / read rate (the memory's: states that fit in "
            "L3 can move faster); counted on the PyTorch forms of a "
            "step without resets; the three rates timed in the same turns between the streams' steps"
            + (" (exp G elem/s, read GB/s: " + ", ".join(
                f"B={b} {rows[0][f'exp_gelems_{b}']:.2f}, {rows[0][f'read_gbs_{b}']:.1f}" for b in batches)
               + ")" if rows else "")
            + ". Own-shape GEMM: the step's matrix products timed alone, hot, at their "
            "own M = B (the rate this model's products reach here), and the step's fraction of it.",
            "", bench.format_ceiling_table(rows, batches)])
    text += f"\n\nTotal {time.time() - t0:.0f} s."
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        record = {"rates": rates, "threads": args.threads, "rows": rows}
        Path(args.json).write_text(json.dumps(record, indent=1))
    return text


if __name__ == "__main__":
    main()
