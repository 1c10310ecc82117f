"""The attention step's cache pass at many streams: how fast the fused step (``csrc/step/attention.h``)
reads the keys and values it attends, against the single-thread memory read rate of the same process.

    PYTHONPATH=src python benchmarks/bench_attention_step.py [--quick] [--batch 64] [--span 60,85]
        [--layers 8] [--window 0] [--rope] [--qk-norm] [--calls 60]

One sweep steps ``--layers`` attention mixers (4 heads of 64, as the step table's models), each with
its own cache of ``--batch`` rows whose positions are spread over ``--span`` (bench_step.py's streams
attend 60-85 frames); the caches together exceed L3, so each sweep reads them from memory as a model's
step reads its layers'. The model width is small (``--width``) so that the two projections are a few
percent of the call; their time (``linear`` on the same shapes, hot) is subtracted. Attended bytes per
call = keys + values of every visible slot (2 B Hkv Dh * span * itemsize). Sweeps and a 128 MiB
``sum`` (:func:`hybridssm.bench.read_rate`'s pass) alternate, each timed alone, medians kept. Two
builds of the kernels cannot share a process (their modules register the same types): compare two
trees by alternating processes, on "of read" (each process's cache rate over its own read rate).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

HEAD = ["B", "span", "layers", "MB/sweep", "ms/sweep", "cache GB/s", "read GB/s", "of read"]


def parse_span(text: str) -> tuple[int, int]:
    """``"60,85"`` -> ``(60, 85)``: the attended span of the rows runs from the first to the last."""
    parts = text.split(",")
    if (len(parts) != 2 or not all(p.strip().isdigit() for p in parts)
            or not 1 <= int(parts[0]) <= int(parts[1])):
        raise SystemExit(f"--span: {text!r} is not LO,HI with 1 <= LO <= HI (e.g. 60,85)")
    return int(parts[0]), int(parts[1])


def attended_bytes(state, num_prefix: int) -> int:
    """Bytes of keys and values one step attends: per row and kv head, min(pos + 1, slots) slots
    (the new token's included; a window's ring holds its slots), keys and values."""
    k = state.k
    B, Hkv, N, D = k.shape
    n = (state.pos + 1).clamp(max=N)
    return int(n.sum()) * 2 * Hkv * D * k.element_size()


def layers(args, seed: int = 0):
    """``args.layers`` mixers with caches at positions spread over the span; returns the mixers, their
    states, their starting positions and the input frame."""
    from hybridssm.mixers.attention import AttentionMixer

    g = torch.Generator().manual_seed(seed)
    lo, hi = args.span
    out = []
    for _ in range(args.layers):
        m = AttentionMixer(args.width, 4, 64, window_size=args.window or None,
                           positional="rope" if args.rope else "none", qk_layernorm=args.qk_norm).eval()
        st = m.init_state(args.batch, max_len=None if args.window else hi + 16)
        st.k.normal_(generator=g)
        st.v.normal_(generator=g)
        st.pos.copy_(torch.randint(lo - 1, hi, (args.batch,), generator=g))  # the step attends pos + 1
        out.append((m, m.step_spec(), st, st.pos.clone()))
    return out, torch.randn(args.batch, args.width, generator=g)


def median_times(fns, calls: int) -> list[float]:
    """Per function, the median seconds of ``calls`` calls, each timed alone, the functions alternating."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(calls):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def measure(args) -> dict[str, float]:
    """The sweep's attended bytes and seconds (projections subtracted) and the read rate, in GB/s."""
    from hybridssm.bench import READ_MIB
    from hybridssm.ops.step import mixer_step, step_extension

    ext = step_extension()
    mixers, x = layers(args)
    nbytes = sum(attended_bytes(st, 0) for _, _, st, _ in mixers)

    def sweep():
        for _, spec, st, start in mixers:
            st.pos.copy_(start)  # every sweep attends the same spans
            mixer_step(spec, x, list(st), st.pos)

    m0 = mixers[0][0]
    none = torch.empty(0)
    mid = torch.randn(args.batch, m0.o_proj.in_features)

    def projections():
        for m, *_ in mixers:
            ext.linear(x, m.qkv_proj.weight, m.qkv_proj.bias)
            ext.linear(mid, m.o_proj.weight, none if m.o_proj.bias is None else m.o_proj.bias)

    buf = torch.ones(READ_MIB * 2**20 // 4)  # read_rate's buffer
    t_sweep, t_proj, t_read = median_times([sweep, projections, buf.sum], args.calls)
    return {"bytes": nbytes, "sweep_s": t_sweep - t_proj, "proj_s": t_proj,
            "cache_gbs": nbytes / (t_sweep - t_proj) / 1e9, "read_gbs": buf.numel() * 4 / t_read / 1e9}


def row(args, r: dict[str, float]) -> list[str]:
    """One table row: the sweep's size and time, its cache rate, the read rate and their ratio."""
    lo, hi = args.span
    return [str(args.batch), f"{lo}-{hi}", str(args.layers), f"{r['bytes'] / 1e6:.1f}",
            f"{r['sweep_s'] * 1e3:.3f}",
            f"{r['cache_gbs']:.2f}", f"{r['read_gbs']:.2f}", f"{r['cache_gbs'] / r['read_gbs']:.0%}"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small batch, few calls (a smoke run)")
    p.add_argument("--batch", type=int, default=64, help="streams (rows of each cache)")
    p.add_argument("--span", type=parse_span, default=(60, 85), help="LO,HI: the rows' attended slots")
    p.add_argument("--layers", type=int, default=8, help="mixers stepped per sweep (caches cycled)")
    p.add_argument("--width", type=int, default=8, help="model width (the projections' input)")
    p.add_argument("--window", type=int, default=0, help="sliding window (0: full cache)")
    p.add_argument("--rope", action="store_true")
    p.add_argument("--qk-norm", action="store_true")
    p.add_argument("--calls", type=int, default=60, help="timed sweeps (median kept)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.layers, args.calls = 4, 2, 3
    torch.set_num_threads(1)
    with torch.inference_mode():
        r = measure(args)
    print("| " + " | ".join(HEAD) + " |")
    print("|" + "---|" * len(HEAD))
    print("| " + " | ".join(row(args, r)) + " |")
    given = argv if argv is not None else sys.argv[1:]
    print(f"\n`{' '.join(['PYTHONPATH=src python benchmarks/bench_attention_step.py', *given]).strip()}`")


if __name__ == "__main__":
    main()
