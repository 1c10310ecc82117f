"""Mamba and Mamba-2 on CPU: hybridssm against ``transformers`` and DESIGN §5's baseline, measured
with :mod:`hybridssm.bench` (the timing, units and table format of every benchmark here).

    PYTHONPATH=src python benchmarks/bench_mamba.py [--quick] [--threads N] [--out FILE] [--profile]
        [--only NAMES] [--shapes 32x60,4x2048] [--no-memory | --memory-only | --step-only] [--steps N]

Rows: our ``mamba`` and ``mamba2`` (and ``mamba2`` on the PyTorch forms of its ops,
``use_kernels("torch")``: the model before its fused kernels), ``transformers`` MambaModel (the
sequential torch path, and the ``use_mambapy`` path when ``mambapy`` imports), ``transformers``
Mamba2Model (torch path) and the baseline ``nn.TransformerEncoder``
(:class:`hybridssm.bench.BaselineTransformer`: d_model = hidden, 4 heads, FFN x4, dropout 0,
pre-norm, GELU, causal, the same number of layers). Every row takes ``[B, T, 287]`` frames through
``Linear(287, hidden)`` and returns the whole sequence. Shapes: short (B=32, T=60) and long, 8,192
tokens per batch (T = 256, 2048, 4096); the sequential ``transformers`` path runs up to T=256 only
(beyond, an iteration takes over 30 s), and a row whose first forward+backward runs past
``--slow-limit`` is stopped there and not run at longer shapes.

Tables (markdown; the units are in each header):

1. forward+backward and 2. forward: tokens/s per shape, the ratio to the baseline and the fraction
   of the GEMM + exp ceiling (matmul FLOPs counted in the run over the measured GEMM rate, plus the
   row's exponentials over the measured ``exp`` rate in cache, over the measured time);
3. peak memory (MiB) of one forward+backward, each row and shape in its own subprocess;
4. forward+backward speed of each of our rows over every other row;
5. streaming at batch 1 (ms): our in-place step (one fused call, and block by block), re-running
   the 60-frame window (ours and the baseline's), and ``transformers``' cached step.

``--profile`` adds ``torch.profiler``'s top ops of our rows' forward+backward.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hybridssm.bench import (
    MISSING,
    BaselineTransformer,
    BenchSettings,
    ceiling_fraction,
    cell,
    command_line,
    machine_line,
    machine_rates,
    markdown_table,
    measure_modules,
    peak_memory_of,
    percent,
    ratio,
    time_rounds,
    times,
    timing_line,
    top_ops,
    workloads,
)

EMBED = 287  # the seeds' example frame size
SHORT = [(32, 60)]
LONG = [(32, 256), (4, 2048), (2, 4096)]
QUICK_SHAPES = [(4, 16), (2, 32)]  # --quick: a smoke test of every code path, in seconds
HF_SEQUENTIAL_MAX_T = 256  # the sequential path never runs beyond this (> 30 s per iteration)
BASELINE = "TransformerEncoder (baseline)"
WINDOW = 60  # the seeds' real-time window (frames)


# -- the rows --------------------------------------------------------------------------------------
class Projected(nn.Module):
    """``Linear(EMBED, hidden)`` then a ``transformers`` backbone: ``[B, T, EMBED] -> [B, T, hidden]``."""

    def __init__(self, backbone: nn.Module, hidden: int) -> None:
        super().__init__()
        self.embed_dim = EMBED
        self.proj, self.backbone = nn.Linear(EMBED, hidden), backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(inputs_embeds=self.proj(x), use_cache=False).last_hidden_state


class WithKernels(nn.Module):
    """Our model's whole-sequence forward under ``use_kernels(backend)`` (its backward follows the
    graph that forward built)."""

    def __init__(self, model: nn.Module, backend: str) -> None:
        super().__init__()
        self.embed_dim, self.model, self.backend = model.config.embed_dim, model, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from hybridssm.ops._kernels import use_kernels

        with use_kernels(self.backend):
            return self.model(x, return_sequence=True)


def _hf_mamba(hidden: int, layers: int, mambapy: bool) -> Projected:
    from transformers import MambaConfig, MambaModel

    cfg = MambaConfig(
        hidden_size=hidden, state_size=16, expand=2, conv_kernel=4, num_hidden_layers=layers,
        vocab_size=16, use_mambapy=mambapy, use_associative_scan=False,
    )
    return Projected(MambaModel(cfg), hidden)


def _hf_mamba2(hidden: int, layers: int) -> Projected:
    from transformers import Mamba2Config, Mamba2Model

    head_dim = min(64, 2 * hidden)
    cfg = Mamba2Config(
        hidden_size=hidden, state_size=16, expand=2, conv_kernel=4, num_hidden_layers=layers,
        vocab_size=16, head_dim=head_dim, num_heads=2 * hidden // head_dim, n_groups=1, chunk_size=256,
    )
    return Projected(Mamba2Model(cfg), hidden)


def _ours(name: str, hidden: int, layers: int) -> nn.Module:
    import hybridssm as hs

    return hs.build(name, embed_dim=EMBED, hidden_size=hidden, num_layers=layers)


BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "hybridssm mamba": lambda h, n: _ours("mamba", h, n),
    "hybridssm mamba2": lambda h, n: _ours("mamba2", h, n),
    "hybridssm mamba2 (torch kernels)": lambda h, n: WithKernels(_ours("mamba2", h, n), "torch"),
    "transformers Mamba (sequential)": lambda h, n: _hf_mamba(h, n, False),
    "transformers Mamba (mambapy)": lambda h, n: _hf_mamba(h, n, True),
    "transformers Mamba2 (torch)": _hf_mamba2,
    BASELINE: lambda h, n: BaselineTransformer(EMBED, h, 4, n),
}


def build_row(name: str, hidden: int, layers: int) -> nn.Module:
    """The module of row ``name`` (also the factory of the peak-memory subprocesses)."""
    return BUILDERS[name](hidden, layers)


@dataclass
class Row:
    name: str
    kind: str  # "mamba", "mamba2" or "attention": what its exponentials are (see ``exps``)
    skip: str = ""  # why the whole row is not run ("" = it runs)
    max_t: int | None = None  # longer shapes are not run


def rows() -> list[Row]:
    """Every row, in table order; those that cannot run here say why."""
    import hybridssm as hs

    registered = "mamba2" in hs.list_models()
    missing = "" if registered else "not registered in this build"
    out = [Row("hybridssm mamba", "mamba")]
    out += [Row("hybridssm mamba2", "mamba2", missing),
            Row("hybridssm mamba2 (torch kernels)", "mamba2", missing),
            Row("transformers Mamba (sequential)", "mamba", max_t=HF_SEQUENTIAL_MAX_T)]
    try:
        import mambapy  # noqa: F401

        out.append(Row("transformers Mamba (mambapy)", "mamba"))
    except ImportError:
        reason = "mambapy not installed (pip install mambapy)"
        out.append(Row("transformers Mamba (mambapy)", "mamba", reason))
    return out + [Row("transformers Mamba2 (torch)", "mamba2"), Row(BASELINE, "attention")]


def exps(kind: str, shape: tuple[int, int], hidden: int, layers: int, train: bool) -> float:
    """The exponentials of one call: Mamba-1's decays ``exp(dt * A)``, one per (token, channel,
    state) with 2 * hidden channels and 16 states; Mamba-2's, one per (token, head) with 64-wide
    heads; attention's softmax, the causal half of T x T per head (4 heads). The backward doubles
    them. The GEMM part of the ceiling is counted in the run (``matmul_flops``)."""
    B, T = shape
    per_layer = {"mamba": B * T * 2 * hidden * 16, "mamba2": B * T * 2 * hidden / 64,
                 "attention": 4 * B * T * T / 2}[kind]
    return layers * per_layer * (2 if train else 1)


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


class Notes:
    """Numbered footnotes: the same text gets the same number."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"— [{self.texts.index(text) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{i}] {t}" for i, t in enumerate(self.texts, 1)]


def _shape_head(shapes: list[tuple[int, int]]) -> list[str]:
    return [f"B={B} T={T}" for B, T in shapes]


def why_not_run(r: Row, T: int, stopped: dict[str, int], slow_limit: float) -> str | None:
    """Why row ``r`` does not run at length ``T`` (its footnote), or None when it runs."""
    if r.skip:
        return f"{r.name}: {r.skip}"
    if r.max_t is not None and T > r.max_t:
        return f"{r.name} runs up to T={r.max_t} only: beyond, an iteration takes over 30 s (DESIGN §5)"
    if r.name in stopped and T >= stopped[r.name]:
        return (f"stopped: the first forward+backward was still running after {slow_limit:.0f} s "
                "(DESIGN §5); longer shapes are not run")
    return None


# -- the tables ------------------------------------------------------------------------------------
def throughput(args, table: list[Row], shapes, settings: BenchSettings, rates, notes: Notes, out: list[str]):
    """Times every row at every shape (rows interleaved within a shape); appends the forward+backward
    and forward tables to ``out``; returns ``{(row, shape): measure_modules' result}`` and the rows
    stopped by ``--slow-limit`` (name -> the length where)."""
    results: dict[tuple[str, tuple[int, int]], dict] = {}
    stopped: dict[str, int] = {}
    for B, T in shapes:
        torch.manual_seed(0)
        x = torch.randn(B, T, EMBED)
        run = {}
        for r in table:
            if why_not_run(r, T, stopped, args.slow_limit) is None:
                torch.manual_seed(0)
                run[r.name] = build_row(r.name, args.hidden, args.layers)
        for name, res in measure_modules(run, x, settings, slow_limit=args.slow_limit,
                                          count_fwd_flops=True).items():
            results[(name, (B, T))] = res
            if res["too_slow"]:
                stopped[name] = T
            print(f"  {name:34s} B={B:3d} T={T:5d}  fwd+bwd {cell(res['fwd_bwd_tok_s'], ',.0f'):>9} tok/s"
                  f"  fwd {cell(res['fwd_tok_s'], ',.0f'):>9} tok/s", flush=True)
    for train, title in ((True, "forward+backward"), (False, "forward (no grad)")):
        key = "fwd_bwd" if train else "fwd"
        lines = []
        for r in table:
            cells = []
            for B, T in shapes:
                res = results.get((r.name, (B, T)))
                if res is None or res[f"{key}_s"] is None:
                    why = why_not_run(r, T, stopped, args.slow_limit)
                    cells.append(notes.mark(why) if why else MISSING)
                    continue
                base = results.get((BASELINE, (B, T)), {}).get(f"{key}_tok_s")
                flops = res["flops" if train else "fwd_flops"]
                ceil = ceiling_fraction(res[f"{key}_s"], rates, flops,
                                        exps(r.kind, (B, T), args.hidden, args.layers, train))
                cells.append(f"{res[f'{key}_tok_s']:,.0f} ({times(ratio(res[f'{key}_tok_s'], base))}; "
                             f"{percent(ceil)})")
            lines.append([r.name] + cells)
        out += ["", f"### {title}: tokens/s (ratio to the baseline; fraction of the GEMM + exp ceiling)", "",
                markdown_table(["model"] + _shape_head(shapes), lines)]
    longs = [s for s in shapes if s in LONG]
    if len(longs) > 1:  # DESIGN §5's target: grows < 1.5x from T=256 to T=4096
        first, last = (results.get(("hybridssm mamba", s), {}).get("fwd_bwd_s")
                       for s in (longs[0], longs[-1]))
        if first and last:
            growth = last / (longs[-1][0] * longs[-1][1]) / (first / (longs[0][0] * longs[0][1]))
            out += ["", f"hybridssm mamba forward+backward time per token, T={longs[-1][1]} vs "
                    f"T={longs[0][1]}: {times(growth)}"]
    return results, stopped


def memory(args, table: list[Row], shapes, results, stopped, notes: Notes, out: list[str]) -> None:
    """Appends the peak-memory table: each row and shape in its own subprocess (rows that were not
    timed, when ``results`` is given, are not measured)."""
    lines = []
    for r in table:
        cells = []
        for B, T in shapes:
            res = None if results is None else results.get((r.name, (B, T)))
            why = why_not_run(r, T, stopped, args.slow_limit)
            if why or (results is not None and res is None):
                cells.append(notes.mark(why) if why else MISSING)
                continue
            timeout = 600 if res is None else max(120.0, 4 * res["first_s"])
            mib = peak_memory_of(f"{os.path.abspath(__file__)}:build_row", [r.name, args.hidden, args.layers],
                                 (B, T), threads=args.threads, timeout=timeout)
            cells.append(cell(mib, ",.0f") if mib is not None else notes.mark("the subprocess failed"))
        lines.append([r.name] + cells)
    out += ["", "### peak memory of one forward+backward: MiB above the resident set before it (each row "
            "and shape in its own subprocess, after one untimed forward+backward)", "",
            markdown_table(["model"] + _shape_head(shapes), lines)]


def speed_ratios(table: list[Row], shapes, results, out: list[str]) -> None:
    """Appends our rows' forward+backward speed over every other row's (> 1: ours is faster)."""
    timed = [r.name for r in table if any((r.name, s) in results for s in shapes)]
    ours = [n for n in timed if n.startswith("hybridssm")]
    if not ours:
        return
    lines = []
    for a in ours:
        for b in timed:
            if b not in (a, BASELINE):
                lines.append([a, b] + [times(ratio(results.get((a, s), {}).get("fwd_bwd_tok_s"),
                                                   results.get((b, s), {}).get("fwd_bwd_tok_s")))
                                       for s in shapes])
    out += ["", "### forward+backward speed ratios: row / column tokens/s (> 1: the row is faster)", "",
            markdown_table(["row", "vs"] + _shape_head(shapes), lines)]


@torch.no_grad()
def streaming(args, warmup: int, out: list[str]) -> None:
    """Appends the batch-1 streaming table (ms): the step rows interleaved in ``--rounds`` rounds,
    then the window re-runs interleaved."""
    torch.manual_seed(0)
    ours = build_row("hybridssm mamba", args.hidden, args.layers).eval()
    x = torch.randn(1, WINDOW, EMBED)
    frame = torch.randn(1, EMBED)
    state = ours(x, return_state=True)[1]

    def our_step(fused: bool) -> Callable[[], object]:
        def run() -> None:
            ours.use_fused_step = fused
            ours.step(frame, state, inplace=True)
        return run

    steps = {"hybridssm mamba step (inplace)": our_step(True),
             "hybridssm mamba step (inplace), block by block (use_fused_step=False)": our_step(False)}
    failed: dict[str, str] = {}
    hf_name = "transformers Mamba cached step"
    try:
        from transformers import DynamicCache

        hf = build_row("transformers Mamba (sequential)", args.hidden, args.layers).eval()
        cache = DynamicCache(config=hf.backbone.config)
        hf.backbone(inputs_embeds=hf.proj(x), cache=cache, use_cache=True)
        e = frame.unsqueeze(1)
        steps[hf_name] = lambda: hf.backbone(inputs_embeds=hf.proj(e), cache=cache, use_cache=True)
    except Exception as exc:  # noqa: BLE001 - reported in the table, never fatal
        failed[hf_name] = f"— ({type(exc).__name__}: {exc})"
    try:
        timed = time_rounds(steps, args.steps, rounds=args.rounds, warmup=warmup)
        ms = {k: v * 1e3 for k, v in timed.items()}
    finally:
        ours.use_fused_step = True
    base = build_row(BASELINE, args.hidden, args.layers).eval()
    windows = {"hybridssm mamba: re-run 60-frame window": lambda: ours(x),
               "TransformerEncoder: re-run 60-frame window": lambda: base(x)}
    calls = max(20, args.steps // 10)
    ms |= {k: v * 1e3 for k, v in time_rounds(windows, calls, rounds=min(args.rounds, calls),
                                               warmup=warmup).items()}
    mine = ms["hybridssm mamba step (inplace)"]
    order = [*list(steps)[:2], *windows, hf_name]
    lines = [[k, failed[k], ""] if k in failed else [k, cell(ms[k], ".3f"), times(ms[k] / mine)]
             for k in order if k in ms or k in failed]
    out += ["", f"### streaming at batch 1: ms per call (median over {args.steps} steps, step rows "
            f"interleaved in {args.rounds} rounds; windows over {calls} calls)", "",
            markdown_table(["path", "ms", "vs our step"], lines)]


def profiles(args, table: list[Row], shapes, out: list[str]) -> None:
    """Appends ``torch.profiler``'s top ops of our mamba (short shape) and mamba2 (every shape)."""
    for name, at in (("hybridssm mamba", shapes[:1]), ("hybridssm mamba2", shapes)):
        if not any(r.name == name and not r.skip for r in table):
            continue
        for B, T in at:
            torch.manual_seed(0)
            model = build_row(name, args.hidden, args.layers).train()
            fb, _ = workloads(model, torch.randn(B, T, EMBED))
            out += ["", f"{name} forward+backward, B={B} T={T} (3 iterations):", "", "```",
                    top_ops(fb, calls=3, row_limit=20), "```"]


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: hidden 16, shapes 4x16 and 2x32, few iterations, no peak memory")
    p.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16), help="torch threads (fixed)")
    p.add_argument("--hidden", type=int, help="hidden size (default 256; 16 with --quick)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--budget", type=float, help="seconds per measurement (protocol: 3; 0.05 with --quick)")
    p.add_argument("--slow-limit", type=float, default=30.0,
                   help="seconds: stop a row whose first forward+backward takes longer (default 30)")
    p.add_argument("--out", help="also write the markdown tables to this file")
    p.add_argument("--profile", action="store_true",
                   help="print profiles of our mamba fwd+bwd (short shape) and mamba2 (every shape)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row peak memory subprocesses")
    p.add_argument("--memory-only", action="store_true", help="only the peak memory table")
    p.add_argument("--only", help="comma-separated substrings: keep only the rows whose name contains one "
                   "(case-insensitive; the baseline row is always kept), e.g. --only mamba2")
    p.add_argument("--shapes", help="comma-separated BxT shapes instead of the protocol's, e.g. 32x60,4x2048")
    p.add_argument("--step-only", action="store_true", help="only the batch-1 streaming table")
    p.add_argument("--steps", type=int, help="steps per streaming row (default 1000; 10 with --quick)")
    p.add_argument("--rounds", type=int, default=10, help="interleaving rounds of the streaming step rows")
    args = p.parse_args(argv)
    args.hidden = args.hidden or (16 if args.quick else 256)
    torch.set_num_threads(args.threads)
    import hybridssm as hs

    shapes = parse_shapes(args.shapes) if args.shapes else QUICK_SHAPES if args.quick else SHORT + LONG
    budget = {"max_time": args.budget} if args.budget else {}
    settings = BenchSettings.quick(**budget) if args.quick else BenchSettings(**budget)
    args.steps = args.steps or settings.latency_steps
    kernels = hs.kernels(build=True)  # built now: never inside a timed (alarmed) iteration
    rates = machine_rates("cpu", seconds=0.05 if args.quick else 0.5)
    command = command_line("benchmarks/bench_mamba.py", argv)
    machine = machine_line(rates, str(args.threads), kernels)
    out = ["# Mamba CPU benchmark", "", f"`{command}`", "", machine, "",
           f"hidden {args.hidden}, {args.layers} layers, embed_dim {EMBED}. {timing_line(settings)}. Units: "
           "tokens/s, MiB, ms; ceilings from the GEMM and exp rates above."]
    print("\n".join(out), flush=True)
    head = len(out)
    table = select(rows(), args.only)
    notes = Notes()
    if args.step_only:
        streaming(args, settings.latency_warmup, out)
    elif args.memory_only:
        memory(args, table, shapes, None, {}, notes, out)
    else:
        results, stopped = throughput(args, table, shapes, settings, rates, notes, out)
        if not (args.no_memory or args.quick):
            memory(args, table, shapes, results, stopped, notes, out)
        speed_ratios(table, shapes, results, out)
        if any(r.name == "hybridssm mamba" for r in table):
            streaming(args, settings.latency_warmup, out)
        if args.profile:
            profiles(args, table, shapes, out)
    if notes.texts:
        out += [""] + notes.lines()
    text = "\n".join(out)
    print("\n".join(out[head:]))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
