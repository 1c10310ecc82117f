"""Diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t``.

Layout: ``a, b [B, T, D]``, ``h0 [B, D]``. Returns ``(h [B, T, D], h_T [B, D])``, both in the
wider of fp32 and the input dtype. Used by GatedSSM's context and Griffin's RG-LRU. A row whose
right padding should not move its state passes ``a = 1, b = 0`` there (identity steps).

The fast form is a Hillis-Steele scan: ``ceil(log2 T)`` rounds of elementwise products. It never
divides by cumulative products, so strong decay only underflows towards zero (the true value).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._checks import ShapeCheck
from hybridssm.ops._dtypes import acc_dtype
from hybridssm.ops._time import scan_time_chunks, symbolic_length

__all__ = ["linear_rnn", "linear_rnn_ref"]

EXPORT_CHUNK = 64  # chunk length of the symbolic-length form (exported programs)


def linear_rnn_ref(a: Tensor, b: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence, one timestep at a time."""
    acc = acc_dtype(b.dtype)
    h = h0.to(acc)
    hs = []
    for t in range(b.shape[1]):
        h = a[:, t].to(acc) * h + b[:, t].to(acc)
        hs.append(h)
    return torch.stack(hs, dim=1), h


def linear_rnn_torch(a: Tensor, b: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """Fast form: log-depth parallel scan of the pairs ``(a_t, b_t)``.

    The number of rounds depends on ``T``: while exporting a symbolic ``T`` the scan runs per chunk
    of ``EXPORT_CHUNK`` steps instead (padded with identity steps ``a = 1, b = 0``), the chunks in
    sequence (:mod:`hybridssm.ops._time`)."""
    acc = acc_dtype(b.dtype)
    a, b = a.to(acc), b.to(acc)
    if symbolic_length(b.shape[1]):
        def chunk(h: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
            hs, h = linear_rnn_torch(a, b, h)
            return h, hs

        h, hs = scan_time_chunks(chunk, h0.to(acc), (a, b), EXPORT_CHUNK, pads=(1.0, 0.0))
        return hs, h
    # Fold the initial state into the first input: b_0 <- a_0 h0 + b_0.
    b = torch.cat([b[:, :1] + a[:, :1] * h0.to(acc).unsqueeze(1), b[:, 1:]], dim=1)
    T, k = b.shape[1], 1
    while k < T:
        # Combine each step with the partial result k steps back: (a, b) o (a', b') = (aa', a b' + b)
        b = torch.cat([b[:, :k], a[:, k:] * b[:, :-k] + b[:, k:]], dim=1)
        if 2 * k < T:
            a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    return b, b[:, -1]


_kernels.register("linear_rnn", ref=linear_rnn_ref, torch_impl=linear_rnn_torch)


def linear_rnn(a: Tensor, b: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """``h_t = a_t * h_{t-1} + b_t``; see the module docstring. A wrong shape raises ``ValueError``
    naming the argument."""
    check = ShapeCheck("linear_rnn")
    for name, t, dims in (("a", a, "BTD"), ("b", b, "BTD"), ("h0", h0, "BD")):
        check(name, t, dims)
    return _kernels.get("linear_rnn", b.device)(a, b, h0)
