"""Sequential loops over chunks of time that ``torch.export`` can keep symbolic.

The chunked forms loop over chunks in Python: in eager mode and under ``torch.compile`` that is
cheap (a few chunks, each a batch of matmuls). ``torch.export`` with a dynamic sequence length
cannot unroll a loop whose trip count depends on ``T``; while it traces a symbolic ``T``
(:func:`symbolic_length`), the helpers here pad the time axis to whole chunks and run the same
per-chunk body through ``torch._higher_order_ops.scan``, which an exported program keeps as one
loop node. Eager code paths do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["symbolic_length", "num_chunks", "split_chunks", "join_chunks", "scan_leading", "scan_time_chunks",
           "pad_time"]


def symbolic_length(T: int | torch.SymInt) -> bool:
    """True while ``torch.export`` traces the sequence length ``T`` as a symbol (a dynamic dim)."""
    return isinstance(T, torch.SymInt) and torch.compiler.is_exporting()


def num_chunks(T: int | torch.SymInt, chunk: int) -> int | torch.SymInt:
    """``ceil(T / chunk)``; one more while exporting a symbolic ``T``. The spare chunk (identity
    steps, cut off at the end) keeps the count >= 2: torch specialises a symbolic size that may be
    1 (broadcasting, contiguity), which would pin ``T``."""
    if symbolic_length(T):  # one floor division (not ceil + 1): sympy then sees n * chunk whole
        return (T + 2 * chunk - 1) // chunk
    return (T + chunk - 1) // chunk


def split_chunks(x: Tensor, n: int | torch.SymInt, chunk: int, dim: int) -> Tensor:
    """``x [..., n * chunk, ...]`` -> ``[..., n, chunk, ...]`` on ``dim``. A view; while exporting a
    symbolic length, a gather by index: the view's strides would be symbolic products that later
    reshapes (batched matmuls) cannot prove mergeable, and torch would pin ``T``."""
    if symbolic_length(n):
        idx = torch.arange(n, device=x.device).unsqueeze(1) * chunk + torch.arange(chunk, device=x.device)
        return x[(slice(None),) * dim + (idx,)]
    return x.unflatten(dim, (n, chunk))


def join_chunks(x: Tensor, T: int | torch.SymInt, dim: int) -> Tensor:
    """``x [..., n, Q, ...]`` (chunks on ``dim``, steps on ``dim + 1``) -> ``[..., T, ...]``: the first
    ``T`` steps. A view and a slice; while exporting a symbolic ``T``, a gather by index (slicing
    a symbolic size to ``T`` makes torch guard on bounds it cannot prove)."""
    if symbolic_length(T):
        t = torch.arange(T, device=x.device)
        Q = x.shape[dim + 1]
        return x[(slice(None),) * dim + (t // Q, t % Q)]
    return x.flatten(dim, dim + 1)[(slice(None),) * dim + (slice(0, T),)]


def _scan(fn: Callable, carry: Tensor, xs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    from torch._higher_order_ops.scan import scan

    def body(c: Tensor, x: list[Tensor]) -> tuple[Tensor, Tensor]:
        c, y = fn(c, *x)
        # scan wants fresh outputs (no aliases) and a carry laid out as it came in
        return c.clone(memory_format=torch.contiguous_format), y.clone()

    return scan(body, carry.contiguous(), list(xs))


def scan_leading(fn: Callable[..., tuple[Tensor, Tensor]], carry: Tensor, xs: Sequence[Tensor],
                 dim: int = 0) -> tuple[Tensor, Tensor]:
    """``carry, y_n = fn(carry, *(x.select(dim, n) for x in xs))`` for each ``n`` along ``dim``;
    returns ``(final carry, y)`` with the ``y_n`` stacked on ``dim``. A Python loop, or one
    ``scan`` node while exporting a symbolic number of steps."""
    n = xs[0].shape[dim]
    if symbolic_length(n):
        carry, ys = _scan(fn, carry, [x.movedim(dim, 0) for x in xs])
        return carry, ys.movedim(0, dim)
    ys = []
    for i in range(n):
        carry, y = fn(carry, *(x.select(dim, i) for x in xs))
        ys.append(y)
    return carry, torch.stack(ys, dim=dim)


def pad_time(x: Tensor, pad: int | torch.SymInt, value: float = 0.0, dim: int = 1) -> Tensor:
    """``x`` with ``pad`` entries of ``value`` appended along ``dim`` (symbolic ``pad`` allowed)."""
    widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
    return F.pad(x, widths, value=value)


def scan_time_chunks(fn: Callable[..., tuple[Tensor, Tensor]], carry: Tensor, xs: Sequence[Tensor],
                     chunk: int, pads: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """Run ``carry, y_c = fn(carry, *(x[:, c] for x in xs))`` over consecutive time chunks of at
    most ``chunk`` steps of ``xs`` (``[B, T, ...]``, time on dim 1); returns ``(final carry, y)``
    with the ``y_c`` (``[B, Q, ...]``) joined along time.

    In eager mode (and under ``torch.compile``) the last chunk is shorter. While exporting a
    symbolic ``T``, ``xs`` are padded to whole chunks with ``pads`` (one value per input, default
    0), which must make the padded steps identity steps of the recurrence (the final carry is the
    state at ``T``); the chunks then go through one ``scan`` and ``y`` is cut back to ``T``."""
    B, T = xs[0].shape[:2]
    if not symbolic_length(T):
        ys = []
        for t0 in range(0, T, chunk):
            carry, y = fn(carry, *(x[:, t0:t0 + chunk] for x in xs))
            ys.append(y)
        return carry, (torch.cat(ys, dim=1) if len(ys) > 1 else ys[0])
    n = num_chunks(T, chunk)
    pads = pads or [0.0] * len(xs)
    # [B, T, ...] -> [n, B, Q, ...]: the chunk index leads, for the scan
    chunks = [pad_time(x, n * chunk - T, p).unflatten(1, (n, chunk)).movedim(1, 0) for x, p in zip(xs, pads)]
    carry, ys = _scan(fn, carry, chunks)  # ys [n, B, Q, ...]
    return carry, join_chunks(ys.movedim(0, 1), T, 1)
