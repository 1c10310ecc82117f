"""Forward+backward time of the chunked delta rule against the reference loop.

    PYTHONPATH=src python benchmarks/delta_rule_op.py [--threads 2]

Shapes (DESIGN §5): short (B=32, T=60) and long (B=4, T=2048), H=4, K=V=64, gated. Timing: 2
warm-up iterations, then repeat until 3 s or 20 iterations; the median is reported. A path whose
first iteration takes longer than ``--slow-limit`` seconds (30, DESIGN §5) is timed once, marked *.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hybridssm.ops.delta_rule import delta_rule_chunked, delta_rule_ref


def bench(fn, inputs, slow_limit: float) -> tuple[float, bool]:
    """Median seconds of forward+backward, and whether it was a single (too slow) iteration."""

    def once() -> float:
        t0 = time.perf_counter()
        leaves = [x.detach().requires_grad_(True) for x in inputs]
        o, S = fn(*leaves[:5], state=leaves[5])
        (o.sum() + S.sum()).backward()
        return time.perf_counter() - t0

    if (first := once()) > slow_limit:
        return first, True
    once()
    times, start = [], time.perf_counter()
    while len(times) < 20 and time.perf_counter() - start < 3.0:
        times.append(once())
    return statistics.median(times), False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--slow-limit", type=float, default=30.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()}  torch {torch.__version__}")
    print(f"{'shape':>28} {'ref loop ms':>12} {'chunked ms':>11} {'speedup':>8}")
    H, K = 4, 64
    for B, T in [(32, 60), (4, 2048)]:
        q = F.normalize(torch.randn(B, T, H, K), dim=-1)
        k = F.normalize(torch.randn(B, T, H, K), dim=-1)
        v, beta = torch.randn(B, T, H, K), torch.rand(B, T, H)
        g, S0 = -torch.rand(B, T, H), torch.randn(B, H, K, K)
        inputs = (q, k, v, beta, g, S0)
        t_ref, once_ref = bench(delta_rule_ref, inputs, args.slow_limit)
        t_chunk, once_chunk = bench(delta_rule_chunked, inputs, args.slow_limit)
        shape = f"B={B} T={T} H={H} K=V={K}"
        ref, chunk = f"{t_ref * 1e3:.1f}{'*' * once_ref}", f"{t_chunk * 1e3:.1f}{'*' * once_chunk}"
        print(f"{shape:>28} {ref:>12} {chunk:>11} {t_ref / t_chunk:7.1f}x", flush=True)
    print("* one iteration only: slower than --slow-limit (DESIGN §5)")


if __name__ == "__main__":
    main()
