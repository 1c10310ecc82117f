"""Batch-1 streaming step latency of every model, optionally A/B against another checkout.

    PYTHONPATH=src python benchmarks/bench_step.py [--only NAMES] [--steps 300] [--rounds 5]
        [--against /path/to/other/src] [--repeats 3] [--threads 1]

The models and options are ``bench_models.py``'s step table (the seeds' defaults at width 256,
``hybrid`` with every built-in backbone); the step is ``model.step(x_t, state, inplace=True)`` under
``torch.no_grad()``. In one process the models run interleaved, ``--rounds`` rounds of
``--steps / --rounds`` steps each, so that a change in the machine's load hits them alike; the
median of all steps is reported (µs). With ``--against SRC`` the same measurement runs in
subprocesses alternating between this checkout's ``src`` and ``SRC`` (``--repeats`` times each), and
the table gives each side's median over its runs and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def measure(only: set[str] | None, steps: int, rounds: int, threads: int) -> dict[str, float]:
    """Median µs per step of each model, interleaved (runs in whatever ``hybridssm`` is imported)."""
    import torch

    sys.path.insert(0, str(HERE))
    import bench_models as bm

    import hybridssm as hs

    torch.set_num_threads(threads)
    plan = bm.make_plan(False)
    specs = [(m, m, bm.model_options(m, plan)) for m in bm.MODELS if bm.keep(only, m, m)]
    specs += [(f"hybrid[{bb}]", "hybrid", bm.model_options("hybrid", plan, backbone=bb))
              for bb in bm.builtin_backbones() if bm.keep(only, "hybrid", f"hybrid[{bb}]")]
    runs = {}
    with torch.no_grad():
        for label, name, opts in specs:
            torch.manual_seed(0)
            model = hs.build(name, **opts).eval()
            state = model.init_state(1)
            x = torch.randn(1, model.config.embed_dim)
            for _ in range(20):
                model.step(x, state, inplace=True)
            runs[label] = (model, state, x)
        samples: dict[str, list[float]] = {k: [] for k in runs}
        per_round = max(1, steps // rounds)
        for _ in range(rounds):
            for label, (model, state, x) in runs.items():
                ts = samples[label]
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    model.step(x, state, inplace=True)
                    ts.append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e6 for k, v in samples.items()}


def _child(src: Path, args) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, __file__, "--_child", "--steps", str(args.steps), "--rounds", str(args.rounds),
           "--threads", str(args.threads)] + (["--only", args.only] if args.only else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma list of model names or labels (hybrid[gru]), as bench_models.py")
    p.add_argument("--steps", type=int, default=300, help="steps per model (per run)")
    p.add_argument("--rounds", type=int, default=5, help="interleaving rounds per run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--against", help="another checkout's src directory to compare with (A/B)")
    p.add_argument("--repeats", type=int, default=3, help="runs per side with --against")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if args._child:
        print(json.dumps(measure(only, args.steps, args.rounds, args.threads)))
        return ""
    head = [f"# batch-1 step latency (µs, median; {args.threads} thread(s), {args.steps} steps per model "
            f"per run, models interleaved in {args.rounds} rounds)", ""]
    if not args.against:
        res = measure(only, args.steps, args.rounds, args.threads)
        lines = head + ["| model | step µs |", "|---|---|"] + [f"| {k} | {v:.0f} |" for k, v in res.items()]
    else:
        other = Path(args.against).resolve()
        mine: dict[str, list[float]] = {}
        theirs: dict[str, list[float]] = {}
        for _ in range(args.repeats):  # alternate, so that load drifts hit both sides alike
            for src, acc in ((other, theirs), (SRC, mine)):
                for k, v in _child(src, args).items():
                    acc.setdefault(k, []).append(v)
        lines = head + [f"A = {other}, B = {SRC}; each cell: the median over {args.repeats} runs "
                        "(alternating A, B)", "", "| model | A µs | B µs | A / B |", "|---|---|---|---|"]
        for k in theirs:
            a, b = statistics.median(theirs[k]), statistics.median(mine.get(k, [float("nan")]))
            lines.append(f"| {k} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
