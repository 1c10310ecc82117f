"""Converted ``transformers`` models stepping: ``hs.from_transformers(hf).step`` beside the source's
cached step, batch 1, one thread (the README's "Pretrained weights from transformers").

    PYTHONPATH=src python benchmarks/bench_convert.py [--steps 300] [--rounds 3] [--threads 1] [--quick]

Each source is a random ``transformers`` model at width 256 (no download): Mamba with 2 layers,
Jamba with 6 layers, attention every 3rd (``attn_layer_period=3, attn_layer_offset=2``), dense SwiGLU
FFNs x4, 4 heads, 2 kv heads. Both sides first prefill the same 60 frames; then the two steps run
interleaved in ``--rounds`` rounds (:func:`hybridssm.bench.time_rounds`), under
``torch.inference_mode()``; the table gives the medians, their ratio, and the converted model's bar
(its weights read once at the read rate measured in this run, DESIGN §5). The outputs of the first
step are compared, so a wrong conversion cannot be timed. ``--quick``: width 32, a few steps (a smoke
run of the script, not a measurement).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import hybridssm as hs
from hybridssm.bench import (
    WINDOW,
    command_line,
    machine_line,
    machine_rates,
    markdown_table,
    param_bytes,
    ratio,
    time_rounds,
    times,
)

HEAD = ["source", "`transformers` cached step, ms", "converted `step`, ms", "ratio",
        "converted weights MB", "bar ms", "step / bar"]


def sources(width: int) -> dict[str, torch.nn.Module]:
    """The random source models, by label."""
    import transformers as tf

    torch.manual_seed(0)
    mamba = tf.MambaModel(tf.MambaConfig(vocab_size=100, hidden_size=width, state_size=16,
                                         num_hidden_layers=2))
    jamba = tf.JambaModel(tf.JambaConfig(
        vocab_size=100, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, num_experts=1, attn_layer_period=3,
        attn_layer_offset=2, mamba_dt_rank="auto"))
    return {"Mamba (2 layers)": mamba.eval(), "Jamba (6 layers, attention every 3rd)": jamba.eval()}


def measure(hf: torch.nn.Module, steps: int, rounds: int, warmup: int = 10) -> dict[str, float]:
    """``hf_s`` / ``ours_s`` (median seconds per batch-1 step after a prefill) and ``bytes`` (the
    converted model's parameters), with the first step's outputs checked equal."""
    from transformers import DynamicCache

    model = hs.from_transformers(hf)
    d = model.config.embed_dim
    x, x_t = torch.randn(1, WINDOW, d), torch.randn(1, 1, d)
    cache = DynamicCache(config=hf.config)
    hf(inputs_embeds=x, cache=cache, use_cache=True)
    _, state = model(x, return_state=True)
    want = hf(inputs_embeds=x_t, cache=cache, use_cache=True).last_hidden_state[:, 0]
    got, state = model.step(x_t, state, inplace=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    med = time_rounds({
        "hf": lambda: hf(inputs_embeds=x_t, cache=cache, use_cache=True),
        "ours": lambda: model.step(x_t, state, inplace=True),
    }, steps, rounds=rounds, warmup=warmup)
    return {"hf_s": med["hf"], "ours_s": med["ours"], "bytes": param_bytes(model)}


def row(label: str, m: dict[str, float], read_gbs: float) -> list[str]:
    """One table row: times in ms, the bar of the converted weights at ``read_gbs``."""
    bar_s = m["bytes"] / (read_gbs * 1e9)
    return [label, f"{m['hf_s'] * 1e3:.2f}", f"{m['ours_s'] * 1e3:.2f}",
            f"**{times(ratio(m['hf_s'], m['ours_s']))}**", f"{m['bytes'] / 1e6:.1f}",
            f"{bar_s * 1e3:.2f}", times(ratio(m["ours_s"], bar_s))]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="timed steps per side (default: 300)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: width 32, 6 steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    width, steps, rounds = (32, 6, 2) if args.quick else (256, args.steps, args.rounds)
    rates = machine_rates(seconds=0.1 if args.quick else 0.5)
    print(machine_line(rates, str(args.threads)))
    print(f"\nBatch 1, median of {steps} steps in {rounds} interleaved rounds after a {WINDOW}-frame "
          f"prefill, width {width}.\n")
    rows = []
    with torch.inference_mode():
        for label, hf in sources(width).items():
            rows.append(row(label, measure(hf, steps, rounds, warmup=2 if args.quick else 10),
                            rates["read_gbs"]))
    print(markdown_table(HEAD, rows))
    print(f"\n{command_line('benchmarks/bench_convert.py', argv)}")


if __name__ == "__main__":
    main()
