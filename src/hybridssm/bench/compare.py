"""One registered model beside DESIGN §5's baseline (``hybridssm bench``): the baseline itself,
the protocol's shapes, and the rows and table of one comparison."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hybridssm.registry import build

from .memory import peak_memory
from .tables import cell, markdown_table
from .timing import BenchSettings, measure_modules, step_latency, window_latency

__all__ = ["SHAPES", "BaselineTransformer", "baseline_for", "bench_model", "build_row", "format_table"]

# DESIGN §5: the seeds' real-time case and the long shapes (8,192 tokens per batch).
SHAPES = {"short": [(32, 60)], "long": [(32, 256), (4, 2048), (2, 4096)]}


class BaselineTransformer(nn.Module):
    """DESIGN §5's baseline: input projection -> ``nn.TransformerEncoder`` (pre-norm, GELU, FFN
    x4, dropout 0, causal) ``[B, T, embed_dim] -> [B, T, hidden_size]``."""

    def __init__(self, embed_dim: int, hidden_size: int, num_heads: int, num_layers: int) -> None:
        super().__init__()
        self.embed_dim, self.hidden_size = embed_dim, hidden_size
        self.input_proj = nn.Linear(embed_dim, hidden_size) if embed_dim != hidden_size else nn.Identity()
        layer = nn.TransformerEncoderLayer(
            hidden_size, num_heads, 4 * hidden_size, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device, dtype=x.dtype)
        return self.encoder(self.input_proj(x), mask=mask, is_causal=True)


def baseline_for(model: nn.Module) -> BaselineTransformer:
    """The baseline of the same width, depth and input size as ``model``."""
    c = model.config
    heads = getattr(c, "num_heads", 4)
    if c.hidden_size % heads:
        heads = 1  # nn.MultiheadAttention needs heads | width; only tiny test sizes hit this
    return BaselineTransformer(c.embed_dim, c.hidden_size, heads, c.num_layers)


def build_row(model_name: str, options: Mapping[str, Any], baseline: bool = False) -> nn.Module:
    """The registered model ``model_name`` built with ``options``, or its baseline (the factory
    of :func:`~hybridssm.bench.memory.peak_memory`)."""
    model = build(model_name, **options)
    return baseline_for(model) if baseline else model


BASELINE = "nn.TransformerEncoder"


def bench_model(model_name: str, options: Mapping[str, Any], shape: tuple[int, int], *,
                settings: BenchSettings | None = None, device: str = "cpu", baseline: bool = True,
                imports: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows (the model, then the baseline) with forward+backward and forward tokens/s, step and
    window latency (ms) and peak memory (MiB); ``ratio`` = the model's fwd+bwd rate over the
    baseline's."""
    settings = settings or BenchSettings()
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build(model_name, **options).to(dev)
    cands: dict[str, nn.Module] = {model_name: model}
    if baseline:
        cands[BASELINE] = baseline_for(model).to(dev)
    B, T = shape
    x = torch.randn(B, T, model.config.embed_dim, device=dev)
    measured = measure_modules(cands, x, settings, count_flops=False)
    rows = []
    for name, m in cands.items():
        is_model = name == model_name
        rows.append({
            "model": name,
            "shape": f"({B}, {T})",
            "fwd_bwd_tok_s": measured[name]["fwd_bwd_tok_s"],
            "fwd_tok_s": measured[name]["fwd_tok_s"],
            "step_ms": step_latency(m, settings) * 1e3 if is_model else None,
            "window_ms": window_latency(m, T, settings) * 1e3,
            "params": sum(p.numel() for p in m.parameters()),
            "peak_mib": (
                peak_memory(model_name, options, shape, baseline=not is_model, device=device,
                            threads=torch.get_num_threads(), imports=imports)
                if settings.memory else None
            ),
        })
    if baseline:
        base = rows[-1]["fwd_bwd_tok_s"]
        for r in rows:
            r["ratio"] = r["fwd_bwd_tok_s"] / base
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`bench_model` rows."""
    head = ["model", "shape (B, T)", "params", "fwd+bwd tok/s", "ratio", "fwd tok/s", "step ms (B=1)",
            "window ms (B=1)", "peak MiB"]
    return markdown_table(head, [
        [r["model"], r["shape"], f"{r['params']:,}", cell(r["fwd_bwd_tok_s"], ",.0f"),
         cell(r.get("ratio"), ".2f"), cell(r["fwd_tok_s"], ",.0f"), cell(r["step_ms"], ".3f"),
         cell(r["window_ms"], ".3f"), cell(r["peak_mib"], ".1f")]
        for r in rows
    ])
