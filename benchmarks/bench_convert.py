"""Converted ``transformers`` models stepping: ``hs.from_transformers(hf).step`` beside the source's
cached step, batch 1, one thread (the README's "Pretrained weights from transformers").

    PYTHONPATH=src python benchmarks/bench_convert.py [--steps 300] [--rounds 3] [--threads 1]

Each source is a random ``transformers`` model at width 256 (no download): Mamba with 2 layers,
Jamba with 6 layers, attention every 3rd (``attn_layer_period=3, attn_layer_offset=2``), dense SwiGLU
FFNs x4, 4 heads, 2 kv heads. Both sides first prefill the same 60 frames; then the two steps run
interleaved in ``--rounds`` rounds of ``--steps / --rounds`` steps each, under
``torch.inference_mode()``, and the table gives the medians and their ratio. The outputs of the
first step are compared, so a wrong conversion cannot be timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import hybridssm as hs

D, WINDOW = 256, 60


def _sources() -> dict:
    import transformers as tf

    torch.manual_seed(0)
    mamba = tf.MambaModel(tf.MambaConfig(vocab_size=100, hidden_size=D, state_size=16,
                                         num_hidden_layers=2))
    jamba = tf.JambaModel(tf.JambaConfig(
        vocab_size=100, hidden_size=D, intermediate_size=4 * D, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, num_experts=1, attn_layer_period=3,
        attn_layer_offset=2, mamba_dt_rank="auto"))
    return {"Mamba (2 layers)": mamba.eval(), "Jamba (6 layers, attention every 3rd)": jamba.eval()}


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(hf: torch.nn.Module, steps: int, rounds: int) -> tuple[float, float]:
    """``(transformers ms, ours ms)``: medians of interleaved batch-1 steps after a prefill."""
    from transformers import DynamicCache

    model = hs.from_transformers(hf)
    x, x_t = torch.randn(1, WINDOW, D), torch.randn(1, 1, D)
    cache = DynamicCache(config=hf.config)
    hf(inputs_embeds=x, cache=cache, use_cache=True)
    _, state = model(x, return_state=True)
    want = hf(inputs_embeds=x_t, cache=cache, use_cache=True).last_hidden_state[:, 0]
    got, state = model.step(x_t, state, inplace=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    fns = {
        "hf": lambda: hf(inputs_embeds=x_t, cache=cache, use_cache=True),
        "ours": lambda: model.step(x_t, state, inplace=True),
    }
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        _timed(fn, 10)  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k] += _timed(fn, max(1, steps // rounds))
    return statistics.median(samples["hf"]) * 1e3, statistics.median(samples["ours"]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, width {D}, batch 1, median of {args.steps} steps after a "
          f"{WINDOW}-frame prefill; load average {os.getloadavg()[0]:.1f}\n")
    print("| source | `transformers` cached step, ms | converted `step`, ms | ratio |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for label, hf in _sources().items():
            hf_ms, ours_ms = measure(hf, args.steps, args.rounds)
            print(f"| {label} | {hf_ms:.2f} | {ours_ms:.2f} | **{hf_ms / ours_ms:.1f}x** |")


if __name__ == "__main__":
    main()
