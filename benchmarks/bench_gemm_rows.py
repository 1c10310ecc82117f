"""The streaming steps' projection at many streams: ``x [B, I] @ W [O, I]^T`` as the fused step computes
it (``csrc/step/common.h``'s ``linear_small``: ``gemm_rows.h`` from 5 to 256 rows) against
``torch.mm(x, W.t())`` (MKL), with the weight hot (the same W every call) and cold (a new W each call,
cycling through copies that together exceed the caches, as a step walks its layers).

    PYTHONPATH=src python benchmarks/bench_gemm_rows.py [--quick] [--batches 16,64,256]
        [--shapes 256x256,256x1024,...] [--calls 200] [--cold-mb 64] [--threads 1]

Each call is timed alone, in the thread's CPU time (time spent preempted by other processes does not
count; what they do to the shared caches still does), and the median over the calls is kept; ours
and MKL's calls alternate. GFLOP/s = 2 B I O / seconds per call; "ratio" is
ours over MKL's rate. The 512^3 GEMM rate of the same run (:func:`hybridssm.bench.machine_rates`)
sets them against the machine. The default shapes (I x O) are the projections of
``bench_models.py``'s step table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

# (I, O) of the models' projections (bench_models.py's step table, width 256): in/out projections,
# FFN up/down, attention qkv/out, Mamba's x_proj (O = 48), the delta rules' fused input projections.
SHAPES = [(256, 256), (256, 768), (256, 1024), (256, 1064), (512, 256), (512, 512), (1024, 256), (768, 256),
          (512, 48)]
HEAD = ["I x O", "B", "hot ours", "hot MKL", "hot ratio", "cold ours", "cold MKL", "cold ratio"]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"256x1024,512x48"`` -> ``[(256, 1024), (512, 48)]``; names the bad item otherwise."""
    out = []
    for item in text.split(","):
        parts = item.strip().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise SystemExit(f"--shapes: {item!r} is not IxO with positive integers (e.g. 256x1024)")
        out.append((int(parts[0]), int(parts[1])))
    return out


def median_seconds(fns, calls: int) -> list[float]:
    """Per function, the median CPU seconds (this thread's) of ``calls`` calls, each timed alone,
    the functions alternating call by call (each gets the same load)."""
    times = [[] for _ in fns]
    for fn in fns:
        fn(0)  # warm-up (and the build, for ours)
    for c in range(calls):
        for k, fn in enumerate(fns):
            t0 = time.thread_time()
            fn(c)
            times[k].append(time.thread_time() - t0)
    return [statistics.median(t) for t in times]


def measure(I: int, O: int, B: int, calls: int, cold_bytes: float, seed: int = 0) -> dict[str, float]:
    """GFLOP/s of ours and of MKL at one shape, hot and cold."""
    from hybridssm.ops.step import step_extension

    ext = step_extension()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, I, generator=g)
    none = torch.empty(0)
    copies = max(2, int(cold_bytes // (4 * I * O)))
    Ws = [torch.randn(O, I, generator=g) for _ in range(copies)]
    W = Ws[0]
    torch.testing.assert_close(ext.linear(x, W, none), torch.mm(x, W.t()), rtol=1e-4, atol=1e-4 * I**0.5)
    flops = 2 * B * I * O
    hot = median_seconds([lambda c: ext.linear(x, W, none), lambda c: torch.mm(x, W.t())], calls)
    # cold: ours and MKL each walk all the copies between two uses of one (offset by half the cycle)
    half = copies // 2
    cold = median_seconds([lambda c: ext.linear(x, Ws[c % copies], none),
                           lambda c: torch.mm(x, Ws[(c + half) % copies].t())], max(calls, copies))
    return {"hot_ours": flops / hot[0] / 1e9, "hot_mkl": flops / hot[1] / 1e9,
            "cold_ours": flops / cold[0] / 1e9, "cold_mkl": flops / cold[1] / 1e9}


def row(I: int, O: int, B: int, r: dict[str, float]) -> list[str]:
    """One table row: the four rates (GFLOP/s) and ours over MKL, hot and cold."""
    return [f"{I}x{O}", str(B), f"{r['hot_ours']:.1f}", f"{r['hot_mkl']:.1f}",
            f"{r['hot_ours'] / r['hot_mkl']:.2f}x",
            f"{r['cold_ours']:.1f}", f"{r['cold_mkl']:.1f}", f"{r['cold_ours'] / r['cold_mkl']:.2f}x"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two small shapes, few calls (a smoke run)")
    p.add_argument("--batches", default="16,64,256", help="rows of x (streams), comma-separated")
    p.add_argument("--shapes", default=None, help="IxO,... (default: the models' projections)")
    p.add_argument("--calls", type=int, default=200, help="timed calls per case (median kept)")
    p.add_argument("--cold-mb", type=float, default=64.0,
                   help="MB of weight copies the cold case cycles through")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from hybridssm.bench import machine_rates

    shapes = parse_shapes(args.shapes) if args.shapes else ([(64, 40), (48, 8)] if args.quick else SHAPES)
    batches = [int(b) for b in args.batches.split(",")] if not args.quick else [5, 16]
    calls, cold = (5, 1e5) if args.quick else (args.calls, args.cold_mb * 1e6)
    with torch.inference_mode():
        gemm = machine_rates(seconds=0.05 if args.quick else 0.5)["gemm_gflops"]
        print(f"GEMM 512^3: {gemm:.1f} GFLOP/s ({args.threads} thread(s)); "
              "rates in GFLOP/s, ratio = ours / MKL")
        print("| " + " | ".join(HEAD) + " |")
        print("|" + "---|" * len(HEAD))
        for I, O in shapes:
            for B in batches:
                print("| " + " | ".join(row(I, O, B, measure(I, O, B, calls, cold))) + " |", flush=True)
    args_given = argv if argv is not None else sys.argv[1:]
    cmd = " ".join(["PYTHONPATH=src python benchmarks/bench_gemm_rows.py", *args_given])
    print(f"\n`{cmd.strip()}`")


if __name__ == "__main__":
    main()
