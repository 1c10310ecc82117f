"""Mamba on CPU: hybridssm against ``transformers`` and a TransformerEncoder (DESIGN §5 protocol).

    python benchmarks/bench_mamba.py [--quick] [--threads N] [--out FILE] [--profile]

Rows: our ``mamba`` (and ``mamba2`` when registered), ``transformers`` MambaModel (sequential torch
path; ``use_mambapy`` path when ``mambapy`` imports), ``transformers`` Mamba2Model (torch path) and the
baseline ``torch.nn.TransformerEncoder`` (d_model = hidden, 4 heads, FFN x4, dropout 0, pre-norm, GELU,
causal, the same number of layers and the same input projection). Every model gets
``Linear(embed_dim, hidden)`` in front. Shapes: short (B=32, T=60) and long, 8,192 tokens per batch
(T = 256, 2048, 4096). Timing: fixed thread count, 2 warm-ups, then repeat until 3 s or 20 iterations;
the median. Peak memory: each row in its own subprocess (max RSS, one forward+backward). The GEMM and
exp rates measured in the same run give a ceiling for each row (``ceil``: the time its GEMM FLOPs and
exps would take at those rates, as a fraction of the measured time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

EMBED = 287  # the seeds' example frame size
SHORT = [(32, 60)]
LONG = [(32, 256), (4, 2048), (2, 4096)]
HF_SEQUENTIAL_MAX_T = 256  # the sequential path never runs beyond this (> 30 s per iteration)
TOO_SLOW_S = 30.0  # a row whose next shape would take longer per iteration shows "—" (DESIGN §5)


# -- models ----------------------------------------------------------------------------------------


class _Projected(nn.Module):
    """``Linear(embed_dim, hidden)`` then a backbone taking ``[B, T, hidden]``."""

    def __init__(self, backbone: nn.Module, hidden: int, call: Callable) -> None:
        super().__init__()
        self.proj, self.backbone, self.call = nn.Linear(EMBED, hidden), backbone, call

    def forward(self, x):
        return self.call(self.backbone, self.proj(x))


def _transformer(hidden: int, layers: int) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        hidden, 4, 4 * hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def call(m, h):
        mask = nn.Transformer.generate_square_subsequent_mask(h.shape[1])
        return m(h, mask=mask, is_causal=True)

    return _Projected(enc, hidden, call)


def _hf_call(m, h):
    return m(inputs_embeds=h, use_cache=False).last_hidden_state


def _hf_mamba(hidden: int, layers: int, mambapy: bool) -> nn.Module:
    from transformers import MambaConfig, MambaModel

    cfg = MambaConfig(
        hidden_size=hidden, state_size=16, expand=2, conv_kernel=4, num_hidden_layers=layers,
        vocab_size=16, use_mambapy=mambapy, use_associative_scan=False,
    )
    return _Projected(MambaModel(cfg), hidden, _hf_call)


def _hf_mamba2(hidden: int, layers: int) -> nn.Module:
    from transformers import Mamba2Config, Mamba2Model

    head_dim = min(64, 2 * hidden)
    cfg = Mamba2Config(
        hidden_size=hidden, state_size=16, expand=2, conv_kernel=4, num_hidden_layers=layers,
        vocab_size=16, head_dim=head_dim, num_heads=2 * hidden // head_dim, n_groups=1, chunk_size=256,
    )
    return _Projected(Mamba2Model(cfg), hidden, _hf_call)


def _ours(name: str, hidden: int, layers: int) -> nn.Module:
    import hybridssm as hs

    return hs.build(name, embed_dim=EMBED, hidden_size=hidden, num_layers=layers)


class _WithKernels(nn.Module):
    """Runs the wrapped model's forward under ``use_kernels(backend)`` (its backward follows the
    graph the forward built)."""

    def __init__(self, model: nn.Module, backend: str) -> None:
        super().__init__()
        self.model, self.backend = model, backend

    def forward(self, x):
        from hybridssm.ops._kernels import use_kernels

        with use_kernels(self.backend):
            return self.model(x)


@dataclass
class Row:
    name: str
    build: Callable[[], nn.Module] | None
    skip: str = ""  # reason shown as "—" for the whole row
    max_t: int | None = None  # longer shapes show "—"


BASELINE = "TransformerEncoder (baseline)"


def select(table: list[Row], only: str | None) -> list[Row]:
    """The rows whose name contains one of the comma-separated ``only`` substrings, and the baseline."""
    if not only:
        return table
    keys = [k.strip().lower() for k in only.split(",") if k.strip()]
    return [r for r in table if r.name == BASELINE or any(k in r.name.lower() for k in keys)]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in part.lower().split("x")) for part in text.split(",")]
        if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
            raise ValueError
    except ValueError:
        raise ValueError(
            f"option --shapes must be comma-separated BxT pairs like 32x60,4x2048, got {text!r}"
        ) from None
    return shapes


def rows(hidden: int, layers: int) -> list[Row]:
    import hybridssm as hs

    out = [Row("hybridssm mamba", lambda: _ours("mamba", hidden, layers))]
    if "mamba2" in hs.list_models():
        out.append(Row("hybridssm mamba2", lambda: _ours("mamba2", hidden, layers)))
        # the pure-PyTorch forms of its ops (chunked SSD, conv1d + SiLU, element-wise gated norm):
        # the model before its fused kernels
        out.append(Row("hybridssm mamba2 (torch kernels)",
                       lambda: _WithKernels(_ours("mamba2", hidden, layers), "torch")))
    else:
        out.append(Row("hybridssm mamba2", None, skip="not registered in this build"))
    out.append(Row("transformers Mamba (sequential)", lambda: _hf_mamba(hidden, layers, False),
                   max_t=HF_SEQUENTIAL_MAX_T))
    try:
        import mambapy  # noqa: F401

        out.append(Row("transformers Mamba (mambapy)", lambda: _hf_mamba(hidden, layers, True)))
    except ImportError:
        reason = "mambapy not installed (pip install mambapy)"
        out.append(Row("transformers Mamba (mambapy)", None, skip=reason))
    out.append(Row("transformers Mamba2 (torch)", lambda: _hf_mamba2(hidden, layers)))
    out.append(Row("TransformerEncoder (baseline)", lambda: _transformer(hidden, layers)))
    return out


# -- timing ----------------------------------------------------------------------------------------


def median_time(fn: Callable[[], None], budget_s: float = 3.0, max_iters: int = 20) -> float:
    """2 warm-ups, then repeat until ``budget_s`` or ``max_iters``; the median in seconds."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < budget_s or not times):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _fwd_bwd(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    model.train()

    def run():
        out = model(x)
        out.float().pow(2).mean().backward()
        model.zero_grad(set_to_none=True)

    return run


def _fwd(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        model.eval()
        with torch.no_grad():
            model(x)

    return run


def machine_rates() -> dict[str, float]:
    """fp32 GEMM FLOP/s (projection-shaped) and torch.exp elements/s, measured now."""
    a, b = torch.randn(8192, 512), torch.randn(512, 1024)
    t = median_time(lambda: torch.mm(a, b), budget_s=1.0)
    gemm = 2 * a.shape[0] * a.shape[1] * b.shape[1] / t
    v, out = torch.randn(16 * 2**20), torch.empty(16 * 2**20)
    t = median_time(lambda: torch.exp(v, out=out), budget_s=1.0)
    return {"gemm_flops": gemm, "exp_per_s": v.numel() / t}


def ceiling_seconds(row: str, model: nn.Module, B: int, T: int, hidden: int, layers: int, train: bool,
                    rates: dict[str, float]) -> float:
    """Time the row's GEMM FLOPs (2 per weight per token; x3 with the backward) plus its exps (SSM
    decays: E*N per token per layer, twice with the backward; attention: the causal half of T x T per
    head) would take at the measured rates. Depthwise convs, norms and scans beyond the exp are free."""
    tokens = B * T
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    flops = 2 * tokens * linear
    exps = 0.0
    if "Transformer" in row:
        flops += layers * 2 * 2 * B * T * T / 2 * hidden  # QK^T and PV, causal half
        exps = layers * 4 * B * T * T / 2
    elif "Mamba2" in row or "mamba2" in row:
        exps = layers * tokens * (2 * hidden) / 64  # per head: scalar decays (small)
    else:
        exps = layers * tokens * 2 * hidden * 16
    if train:
        flops, exps = 3 * flops, 2 * exps
    return flops / rates["gemm_flops"] + exps / rates["exp_per_s"]


# -- step latency ----------------------------------------------------------------------------------


def step_latency(hidden: int, layers: int, n_steps: int, rounds: int = 10) -> dict[str, float | str]:
    """Batch 1 (µs): our inplace step (the one-call fused path, and the block-by-block path), re-running
    the 60-frame window, transformers' cached step. The step rows run interleaved, ``rounds`` rounds of
    ``n_steps / rounds`` steps each, so that a change in the machine's load hits them alike; median of
    all steps."""
    res: dict[str, float | str] = {}
    torch.manual_seed(0)
    ours = _ours("mamba", hidden, layers).eval()
    x = torch.randn(1, 60, EMBED)

    def timed(fn, n):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return ts

    def loop(fn, n):
        timed(fn, 20)
        return statistics.median(timed(fn, n)) * 1e6

    with torch.no_grad():
        state = ours.init_state(1)
        for t in range(60):
            ours.step(x[:, t], state, inplace=True)
        frame = torch.randn(1, EMBED)

        def ours_step(fused: bool):
            def run():
                ours.use_fused_step = fused
                ours.step(frame, state, inplace=True)
            return run

        steps: dict[str, Callable[[], object]] = {
            "hybridssm mamba step (inplace)": ours_step(True),
            "hybridssm mamba step (inplace), block by block (use_fused_step=False)": ours_step(False),
        }
        try:
            from transformers import DynamicCache

            hf = _hf_mamba(hidden, layers, False).eval()
            cache = DynamicCache(config=hf.backbone.config)
            hf.backbone(inputs_embeds=hf.proj(x), cache=cache, use_cache=True)
            e = frame.unsqueeze(1)
            steps["transformers Mamba cached step"] = (
                lambda: hf.backbone(inputs_embeds=hf.proj(e), cache=cache, use_cache=True)
            )
        except Exception as exc:  # reported, never fatal
            res["transformers Mamba cached step"] = f"— ({type(exc).__name__}: {exc})"
        samples: dict[str, list[float]] = {k: [] for k in steps}
        for fn in steps.values():
            timed(fn, 20)  # warm-up
        per_round = max(1, n_steps // rounds)
        for _ in range(rounds):
            for k, fn in steps.items():
                samples[k] += timed(fn, per_round)
        ours.use_fused_step = True
        for k, v in samples.items():
            res[k] = statistics.median(v) * 1e6
        res["hybridssm mamba: re-run 60-frame window"] = loop(lambda: ours(x), max(20, n_steps // 10))
        tr = _transformer(hidden, layers).eval()
        res["TransformerEncoder: re-run 60-frame window"] = loop(lambda: tr(x), max(20, n_steps // 10))
    order = ["hybridssm mamba step (inplace)",
             "hybridssm mamba step (inplace), block by block (use_fused_step=False)",
             "hybridssm mamba: re-run 60-frame window", "transformers Mamba cached step",
             "TransformerEncoder: re-run 60-frame window"]
    return {k: res[k] for k in order if k in res}


def step_table(lat: dict[str, float | str], n_steps: int) -> list[str]:
    out = ["", f"### streaming at batch 1 (median over {n_steps} steps, µs; step rows interleaved)", "",
           "| path | µs | vs ours |", "|---|---|---|"]
    mine = lat["hybridssm mamba step (inplace)"]
    for k, v in lat.items():
        out.append(f"| {k} | {v:.0f} | {v / mine:.1f}x |" if isinstance(v, float) else f"| {k} | {v} | |")
    return out


# -- peak memory (one subprocess per row and shape) ------------------------------------------------


def _peak_child(args) -> None:
    torch.set_num_threads(args.threads)
    row = next(r for r in rows(args.hidden, args.layers) if r.name == args.peak_row)
    model = row.build()
    x = torch.randn(args.peak_b, args.peak_t, EMBED)
    run = _fwd_bwd(model, x)
    run()  # first call: lazy inits and kernel builds stay out of the measurement

    def status(field: str) -> float:  # MB, from /proc (ru_maxrss survives exec: the parent's peak)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024

    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the high-water mark to the current RSS
        f.write("5")
    before = status("VmRSS:")
    run()
    peak = status("VmHWM:")
    print(json.dumps({"peak_mb": peak, "delta_mb": peak - before}))


def peak_memory(args, row: str, B: int, T: int) -> str:
    cmd = [sys.executable, __file__, "--_peak-row", row, "--_peak-b", str(B), "--_peak-t", str(T),
           "--threads", str(args.threads), "--hidden", str(args.hidden), "--layers", str(args.layers)]
    try:
        # a fixed mmap threshold: glibc otherwise raises it after frees and keeps the warm-up's
        # buffers in the heap, so the measured run would reuse them and read too low
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        return f"{r['delta_mb']:.0f}"
    except Exception as exc:  # noqa: BLE001 - a failed measurement is shown, not fatal
        return f"— ({type(exc).__name__})"


def memory_table(args, table: list[Row], shapes, results) -> list[str]:
    """Markdown lines: each row's extra memory in one forward+backward, each in its own subprocess;
    rows not timed (``results`` given) are skipped."""
    out = ["", "### peak memory of one forward+backward (MB above the RSS before it; own subprocess)", "",
           "| model | " + " | ".join(f"B={B} T={T}" for B, T in shapes) + " |",
           "|---" * (len(shapes) + 1) + "|"]
    for r in table:
        cells = []
        for B, T in shapes:
            timed = results is None or (r.name, (B, T), "fb") in results
            skip = r.build is None or (r.max_t is not None and T > r.max_t)
            cells.append("—" if skip or not timed else peak_memory(args, r.name, B, T))
        out.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return out


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short shape and one long shape; fewer steps")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0, help="seconds per measurement (protocol: 3)")
    p.add_argument("--out", help="also write the markdown tables to this file")
    p.add_argument("--profile", action="store_true",
                   help="print profiles of our mamba fwd+bwd (short shape) and mamba2 (every shape)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row peak memory subprocesses")
    p.add_argument("--memory-only", action="store_true", help="only the peak memory table")
    p.add_argument("--only", help="comma-separated substrings: keep only the rows whose name contains one "
                   "(case-insensitive; the baseline row is always kept), e.g. --only mamba2")
    p.add_argument("--shapes", help="comma-separated BxT shapes instead of the protocol's, e.g. 32x60,4x2048")
    p.add_argument("--step-only", action="store_true", help="only the batch-1 streaming step table")
    p.add_argument("--steps", type=int, help="steps per streaming row (default 1000; 100 with --quick)")
    p.add_argument("--_peak-row", dest="peak_row", help=argparse.SUPPRESS)
    p.add_argument("--_peak-b", dest="peak_b", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_peak-t", dest="peak_t", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_row:
        _peak_child(args)
        return ""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import hybridssm as hs

    shapes = parse_shapes(args.shapes) if args.shapes else SHORT + (LONG[:1] if args.quick else LONG)
    n_steps = args.steps or (100 if args.quick else 1000)
    lines = ["# Mamba CPU benchmark\n", f"- torch {torch.__version__}, threads: {args.threads} (fixed), "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}, hidden {args.hidden}, "
             f"{args.layers} layers, embed_dim {EMBED}",
             f"- kernels: { {k: v['backend'] for k, v in hs.kernels().items()} }"]
    if args.step_only:
        text = "\n".join(lines + step_table(step_latency(args.hidden, args.layers, n_steps), n_steps))
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return text
    rates = machine_rates()
    if args.memory_only:
        table = select(rows(args.hidden, args.layers), args.only)
        text = "\n".join(lines + memory_table(args, table, shapes, None))
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        return text
    lines.append(f"- measured now: fp32 GEMM {rates['gemm_flops'] / 1e9:.0f} GFLOP/s, "
                 f"torch.exp {rates['exp_per_s'] / 1e9:.2f} G/s")
    print("\n".join(lines), flush=True)

    table = select(rows(args.hidden, args.layers), args.only)
    models = {r.name: r.build() for r in table if r.build is not None}
    results: dict[tuple[str, tuple[int, int], str], float] = {}
    too_slow: set[str] = set()
    for B, T in shapes:  # rows interleaved within each shape
        x = torch.randn(B, T, EMBED)
        for r in table:
            if r.build is None or (r.max_t is not None and T > r.max_t) or r.name in too_slow:
                continue
            m = models[r.name]
            results[(r.name, (B, T), "fb")] = median_time(_fwd_bwd(m, x), args.budget)
            results[(r.name, (B, T), "f")] = median_time(_fwd(m, x), args.budget)
            print(f"  {r.name:34s} B={B:3d} T={T:5d}  fwd+bwd {results[(r.name, (B, T), 'fb')]*1e3:9.1f} ms"
                  f"  fwd {results[(r.name, (B, T), 'f')]*1e3:9.1f} ms", flush=True)
            # tokens grow at most ~4.3x to the next shape; projected beyond the limit: stop this row
            if results[(r.name, (B, T), "fb")] * 8192 / (B * T) > TOO_SLOW_S:
                too_slow.add(r.name)

    base = BASELINE
    out = ["\n".join(lines), ""]
    for mode, title in (("fb", "forward+backward"), ("f", "forward (no grad)")):
        hdr = "| model | " + " | ".join(f"B={B} T={T}" for B, T in shapes) + " |"
        out += [f"### {title}: tokens/s (ratio to the baseline; ceil = GEMM+exp ceiling fraction)", "",
                hdr, "|---" * (len(shapes) + 1) + "|"]
        for r in table:
            cells = []
            for B, T in shapes:
                key = (r.name, (B, T), mode)
                if r.build is None:
                    cells.append(f"— ({r.skip})")
                elif key not in results:
                    cells.append("— [1]")
                else:
                    t = results[key]
                    ratio = results[(base, (B, T), mode)] / t
                    ceil = ceiling_seconds(r.name, models[r.name], B, T, args.hidden, args.layers,
                                           mode == "fb", rates) / t
                    cells.append(f"{B * T / t:,.0f} ({ratio:.2f}x; ceil {ceil:.0%})")
            out.append(f"| {r.name} | " + " | ".join(cells) + " |")
        out.append("")
    out.append(f"[1] not run: a forward+backward at this shape would take > {TOO_SLOW_S:.0f} s per iteration "
               "(projected from the previous shape; DESIGN §5)")

    # time per token across the long shapes (target: grows < 1.5x from T=256 to T=4096)
    longs = [s for s in shapes if s in LONG]
    if len(longs) > 1 and "hybridssm mamba" in models:
        t0 = results[("hybridssm mamba", longs[0], "fb")] / (longs[0][0] * longs[0][1])
        t1 = results[("hybridssm mamba", longs[-1], "fb")] / (longs[-1][0] * longs[-1][1])
        out.append(f"\nhybridssm mamba fwd+bwd time per token, T={longs[-1][1]} vs T={longs[0][1]}: "
                   f"{t1 / t0:.2f}x")

    if not args.no_memory:
        out += memory_table(args, table, shapes, results)

    # ours / each other row at each shape, forward+backward (the mamba2 rows' before / after)
    ours = [r.name for r in table if r.name.startswith("hybridssm") and r.name in models]
    others = [r.name for r in table if r.name in models and r.name != base]
    if ours:
        out += ["", "### forward+backward speed ratios (row / column: > 1 means the row is faster)", "",
                "| row | vs | " + " | ".join(f"B={B} T={T}" for B, T in shapes) + " |",
                "|---|---" + "|---" * len(shapes) + "|"]
        for a in ours:
            for b in others:
                if a == b:
                    continue
                cells = []
                for B, T in shapes:
                    ka, kb = (a, (B, T), "fb"), (b, (B, T), "fb")
                    both = ka in results and kb in results
                    cells.append(f"{results[kb] / results[ka]:.2f}x" if both else "—")
                out.append(f"| {a} | {b} | " + " | ".join(cells) + " |")

    if "hybridssm mamba" in models:
        out += step_table(step_latency(args.hidden, args.layers, n_steps), n_steps)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("hybridssm mamba", "hybridssm mamba2"):
            if name not in models:
                continue
            for B, T in shapes:
                run = _fwd_bwd(models[name], torch.randn(B, T, EMBED))
                run()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        run()
                out += ["", f"{name} forward+backward, B={B} T={T} (3 iterations):", "", "```",
                        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), "```"]
                if name == "hybridssm mamba":
                    break  # the short shape only, as before

    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
