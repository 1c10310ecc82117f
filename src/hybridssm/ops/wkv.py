"""RWKV-6 ("Finch") WKV recurrence with data-dependent, per-channel decay.

Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence".
Per head, with ``S`` a ``[K, V]`` matrix state::

    o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T)        # bonus u for the current token
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T

Layout: ``r, k, w [B, T, H, K]``, ``v [B, T, H, V]``, ``u [H, K]``, ``state [B, H, K, V]``.
``w`` is the **log** of the decay (``w <= 0``, finite; RWKV-6 computes ``w = -exp(.)``); a padded
step passes ``w = 0`` and ``k = 0`` (an identity step). Returns ``(o [B, T, H, V], S_T [B, H, K,
V])``, both in the wider of fp32 and the inputs' dtype.

The fast form is chunked (chunk ``Q``, default 16). Inside a chunk every decay is a sum of log
decays over a range of positions, and every such sum is formed directly (a cumulative sum from the
chunk's boundary, or a masked matmul), never as a difference of two cumulative sums: the log
decays all have one sign, so these sums are exact to rounding even where single steps decay by
e^-1000, whereas dividing cumulative products (or subtracting cumulative log sums) under- and
overflows or cancels. The only exponents taken are of sums <= 0.

* intra-chunk: ``A[t, s] = sum_k r_t k_s exp(sum_{s<j<t} w_j)`` for ``s < t``, plus the bonus
  ``r_t . (u * k_t)`` on the diagonal; ``o = A @ v``;
* inter-chunk: ``o += (r_t * exp(sum_{j<t} w_j)) @ S_prev``; chunk states
  ``S <- exp(sum_chunk w) * S + (k_s * exp(sum_{j>s} w_j))^T @ v`` (a loop over chunks).

Backends (``hybridssm.ops._kernels``, op name ``wkv6``):

* ``ref``: the recurrence, one timestep at a time.
* ``torch``: the chunked form above (any device).
* ``fused``: a C++ kernel (``csrc/wkv6.cpp``), a ``torch.library`` custom op with a fake
  implementation and autograd: per (batch, head) the state stays in a small buffer and each step
  is a rank-1 update and a vector-matrix product. The backward recomputes each chunk of
  ``FUSED_CHECKPOINT`` steps from a checkpoint and runs the adjoint recurrence backwards; every
  gradient, the log decay's included (``exp(w_t) * rowsum(dS_t * S_{t-1})``), is formed from the
  states themselves, so no decay is ever divided by. ``chunk_size`` does not apply to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._checks import ShapeCheck
from hybridssm.ops._cpu_ext import kernel_probe
from hybridssm.ops._custom_op import Backward, kernel_op
from hybridssm.ops._dtypes import acc_dtype
from hybridssm.ops._time import join_chunks, num_chunks, scan_leading, symbolic_length

__all__ = ["wkv6", "wkv6_ref", "wkv6_chunked", "wkv6_fused", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 16
FUSED_CHECKPOINT = 32  # must equal kChunk in csrc/wkv6.cpp


def wkv6_ref(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence one timestep at a time (``chunk_size`` is ignored)."""
    acc = acc_dtype(r.dtype)
    r, k, v, w, u = (t.to(acc) for t in (r, k, v, w, u))
    S = state.to(acc)  # [B, H, K, V]
    outs = []
    for t in range(r.shape[1]):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        outs.append(torch.einsum("bhk,bhkv->bhv", r[:, t], S + u[:, :, None] * kv))
        S = torch.exp(w[:, t]).unsqueeze(-1) * S + kv
    return torch.stack(outs, dim=1), S


def _range_masks(Q: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``M [Q*Q, Q]``: row ``(t, s)`` selects positions ``s < j < t``; ``strict [Q, Q]``: ``s < t``."""
    i = torch.arange(Q, device=device)
    t, s, j = i.view(Q, 1, 1), i.view(1, Q, 1), i.view(1, 1, Q)
    M = ((s < j) & (j < t)).to(dtype).reshape(Q * Q, Q)
    strict = (i.view(Q, 1) > i.view(1, Q)).to(dtype)
    return M, strict


def wkv6_chunked(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Fast form: chunks of ``chunk_size``, intra-chunk as matrices, a loop over chunks."""
    B, T, H, K = r.shape
    acc = acc_dtype(r.dtype)
    if T == 1:  # the streaming step: the recurrence itself, without chunk bookkeeping
        r1, k1, v1, w1 = (x[:, 0].to(acc) for x in (r, k, v, w))  # [B, H, K]
        S0 = state.to(acc)
        kv = k1.unsqueeze(-1) * v1.unsqueeze(-2)  # [B, H, K, V]
        o = torch.matmul(r1.unsqueeze(-2), S0 + u.to(acc).unsqueeze(-1) * kv)  # [B, H, 1, V]
        return o.transpose(1, 2), torch.exp(w1).unsqueeze(-1) * S0 + kv
    Q = chunk_size if symbolic_length(T) else max(1, min(chunk_size, T))  # exports keep T symbolic
    N = num_chunks(T, Q)
    pad = N * Q - T

    def chunks(x: Tensor) -> Tensor:  # [B, T, H, X] -> [B, H, N, Q, X]; tail padded with zeros
        x = F.pad(x.to(acc), (0, 0, 0, 0, 0, pad))
        return x.reshape(B, N, Q, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    # Zero padding is an identity step: w = 0 (decay 1), k = 0; its r = 0 outputs are dropped.
    r_, k_, v_, w_ = chunks(r), chunks(k), chunks(v), chunks(w)  # [B, H, N, Q, *]
    u_ = u.to(acc).view(1, H, 1, 1, K)
    M, strict = _range_masks(Q, r.device, acc)

    # Log decays over ranges, each a direct sum of same-sign terms (see the module docstring).
    before = torch.cumsum(F.pad(w_[:, :, :, :-1], (0, 0, 1, 0)), dim=3)  # sum_{j<t} w_j
    after = torch.flip(torch.cumsum(torch.flip(F.pad(w_[:, :, :, 1:], (0, 0, 0, 1)), [3]), 3), [3])
    total = w_.sum(dim=3)  # [B, H, N, K]: log decay across the whole chunk
    between = torch.matmul(M, w_).view(B, H, N, Q, Q, K)  # [.., t, s, K]: sum_{s<j<t} w_j

    # Intra-chunk attention matrix, strictly lower triangle, then the bonus on the diagonal.
    A = (r_.unsqueeze(4) * k_.unsqueeze(3) * torch.exp(between)).sum(-1) * strict  # [B, H, N, Q, Q]
    A = A + torch.diag_embed((r_ * u_ * k_).sum(-1))
    o = torch.matmul(A, v_)  # [B, H, N, Q, V]

    # Inter-chunk: the state entering each chunk, then its contribution to every query.
    k_end = k_ * torch.exp(after)  # keys decayed to the chunk's end
    U = torch.matmul(k_end.transpose(-1, -2), v_)  # [B, H, N, K, V]
    decay = torch.exp(total).unsqueeze(-1)  # [B, H, N, K, 1]
    S, S_prev = scan_leading(lambda S, d, U: (d * S + U, S), state.to(acc), (decay, U), dim=2)
    o = o + torch.matmul(r_ * torch.exp(before), S_prev)  # S_prev [B, H, N, K, V]
    return join_chunks(o.permute(0, 2, 3, 1, 4), T, 1), S  # [B, N, Q, H, V] -> [B, T, H, V]


# -- fused C++ kernel ------------------------------------------------------------------------------


# (o, S_T, checkpoints): the checkpoints (for the backward) only when `save`; every tensor contiguous,
# one dtype, fp32 or fp64. The backward gives (dr, dk, dv, dw, du, ds0).
_wkv_fwd = kernel_op(
    "wkv6_fwd", extension="wkv6", kernel="wkv6_fwd",
    schema="(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor s0, bool save)"
           " -> (Tensor, Tensor, Tensor)",
    fake=lambda r, k, v, w, u, s0, save: (
        r.new_empty(*r.shape[:3], v.shape[-1]), torch.empty_like(s0),
        r.new_empty((r.shape[0], r.shape[2], math.ceil(r.shape[1] / FUSED_CHECKPOINT), *s0.shape[2:])
                    if save else (0,)),
    ),
    backward=Backward(
        kernel="wkv6_bwd",
        schema="(Tensor do, Tensor dsT, Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, Tensor ckpt)"
               " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        fake=lambda do, dsT, r, k, v, w, u, ckpt: tuple(torch.empty_like(t) for t in (r, k, v, w, u, dsT)),
        save=lambda inputs, outputs: (*inputs[:5], outputs[2]),
        grads=2,
        checkpoint=2,
    ),
)


def wkv6_fused(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """The fused CPU kernel (``chunk_size`` is ignored: see the module docstring)."""
    acc = acc_dtype(r.dtype)
    args = [x.to(acc).contiguous() for x in (r, k, v, w, u, state)]
    save = torch.is_grad_enabled() and any(x.requires_grad for x in args)
    o, sT, _ = _wkv_fwd(*args, save)
    return o, sT


_kernels.register(
    "wkv6", ref=wkv6_ref, torch_impl=wkv6_chunked, fused=wkv6_fused, fused_probe=kernel_probe("wkv6", "WKV")
)


def wkv6(
    r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """The RWKV-6 WKV recurrence; see the module docstring for the layout. A wrong shape raises
    ``ValueError`` naming the argument."""
    check = ShapeCheck("wkv6")
    for name, t, dims in (("r", r, "BTHK"), ("k", k, "BTHK"), ("v", v, "BTHV"), ("w", w, "BTHK"),
                          ("u", u, "HK"), ("state", state, "BHKV")):
        check(name, t, dims)
    return _kernels.get("wkv6", r.device)(r, k, v, w, u, state, chunk_size)
