"""The (gated) delta rule: DeltaNet and Gated DeltaNet's recurrence.

Layout: ``q, k [B, T, H, K]``, ``v [B, T, H, V]``, ``beta [B, T, H]``, ``g [B, T, H]`` the log
decay (``None`` = 0: DeltaNet), ``state [B, H, K, V]``. Per head, with ``a_t = exp(g_t)``::

    S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t * scale                                  (scale defaults to 1 / sqrt(K))

Returns ``(o [B, T, H, V], S_T [B, H, K, V])`` in the wider of fp32 and the input dtype; autocast is
switched off inside so the recurrence accumulates in fp32 even when the projections run in bf16.
``q`` and ``k`` are expected L2-normalised (the mixer does it). A step with ``beta = 0, g = 0`` is
the identity: that is how a row's right padding leaves its state untouched.

Papers: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length" (DeltaNet, the chunkwise WY form); Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks".

Chunkwise form (chunk ``Q``, positions ``i, j`` inside a chunk, ``G_i`` = cumulative log decay from
the chunk's start, ``S_0`` the state entering the chunk). Writing ``S_t = a_t S_{t-1} + k_t u_t^T``
with ``u_t = beta_t (v_t - a_t S_{t-1}^T k_t)`` and unrolling gives the unit lower-triangular system
``(I + A) U = beta V - beta e^G K S_0`` with ``A_ij = beta_i (k_i . k_j) e^{G_i - G_j}`` for
``j < i``; so ``U = W_v - W_k S_0`` with ``[W_v, W_k] = (I + A)^{-1} [beta V, beta e^G K]``, and

    O   = (e^G Q - P W_k) S_0 + P W_v,        P_ij = (q_i . k_j) e^{G_i - G_j} for j <= i
    S_Q = M S_0 + C,   M = e^{G_Q} I - (e^{G_Q - G} K)^T W_k,   C = (e^{G_Q - G} K)^T W_v.

Everything but ``S_Q = M S_0 + C`` is batched over all chunks; only that K x K by K x V product
runs per chunk. Decay differences are masked to ``-inf`` *before* ``exp`` (never a division by
cumulative products), so strong decay underflows to 0, its true value. The tail is padded with
``beta = 0, g = 0`` (identity steps), so the final state is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._checks import ShapeCheck
from hybridssm.ops._dtypes import acc_dtype
from hybridssm.ops._time import join_chunks, num_chunks, scan_leading, symbolic_length

__all__ = ["delta_rule", "delta_rule_ref", "delta_rule_chunked", "DEFAULT_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 64


def _prepare(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor | None,
    scale: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float]:
    """Cast to the accumulation dtype; zero gate and state where absent; the default scale."""
    acc = acc_dtype(q.dtype)
    B, _, H, K = k.shape
    V = v.shape[-1]
    if g is None:
        g = beta.new_zeros(beta.shape, dtype=acc)
    if state is None:
        state = v.new_zeros(B, H, K, V, dtype=acc)
    scale = K**-0.5 if scale is None else scale
    return q.to(acc), k.to(acc), v.to(acc), beta.to(acc), g.to(acc), state.to(acc), scale


def _step(S: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, scale: float):
    """One timestep. ``S [B, H, K, V]``, ``q, k [B, H, K]``, ``v [B, H, V]``, ``beta, g [B, H]``."""
    a = g.exp().unsqueeze(-1)  # [B, H, 1]
    kS = torch.einsum("bhk,bhkv->bhv", k, S)  # k^T S_{t-1}
    u = beta.unsqueeze(-1) * (v - a * kS)  # [B, H, V]
    S = a.unsqueeze(-1) * S + k.unsqueeze(-1) * u.unsqueeze(-2)  # a S + k u^T
    o = torch.einsum("bhk,bhkv->bhv", q, S) * scale
    return o, S


def delta_rule_ref(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
    state: Tensor | None = None, scale: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence as written, one timestep at a time, in fp32 (at least).

    ``chunk_size`` is accepted for a common signature with the chunked form and ignored.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, beta, g, S, scale = _prepare(q, k, v, beta, g, state, scale)
        os = []
        for t in range(q.shape[1]):
            a = g[:, t].exp()[..., None, None]  # [B, H, 1, 1]
            b = beta[:, t][..., None, None]
            kt = k[:, t]  # [B, H, K]
            # S_t = a (I - b k k^T) S_{t-1} + b k v^T
            S = a * (S - b * kt.unsqueeze(-1) * torch.einsum("bhk,bhkv->bhv", kt, S).unsqueeze(-2))
            S = S + b * kt.unsqueeze(-1) * v[:, t].unsqueeze(-2)
            os.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S) * scale)
        return torch.stack(os, dim=1), S


def delta_rule_chunked(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
    state: Tensor | None = None, scale: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Fast form: the chunkwise WY representation (module docstring); ``T == 1`` steps directly."""
    if chunk_size < 1:
        raise ValueError(f"option 'chunk_size' must be a positive integer, got {chunk_size!r}")
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, beta, g, S, scale = _prepare(q, k, v, beta, g, state, scale)
        B, T, H, K = k.shape
        V = v.shape[-1]
        if T == 1:  # streaming step: the recurrence itself is cheapest
            o, S = _step(S, q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0], scale)
            return o.unsqueeze(1), S

        Q = chunk_size if symbolic_length(T) else min(chunk_size, T)  # exports keep T symbolic
        N = num_chunks(T, Q)
        pad = N * Q - T

        def chunks(x: Tensor) -> Tensor:  # [B, T, H, *] -> [B, H, N, Q, *]; identity steps at the tail
            x = x.transpose(1, 2)
            x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
            return x.reshape(B, H, N, Q, *x.shape[3:])

        q, k, v, beta, g = chunks(q * scale), chunks(k), chunks(v), chunks(beta), chunks(g)
        G = g.cumsum(-1)  # [B, H, N, Q] log decay from the chunk's start, inclusive
        causal = torch.ones(Q, Q, dtype=torch.bool, device=q.device).tril()
        # decay from j to i (j <= i); masked before exp so that i < j never overflows
        L = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # [B,H,N,Q,Q]
        kb = k * beta.unsqueeze(-1)  # [B, H, N, Q, K]
        A = (kb @ k.transpose(-1, -2) * L).tril(-1)  # strictly lower; the unit diagonal is implied
        rhs = torch.cat([v * beta.unsqueeze(-1), kb * G.exp().unsqueeze(-1)], dim=-1)
        W = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # [Wv, Wk]

        P = q @ k.transpose(-1, -2) * L  # [B, H, N, Q, Q], intra-chunk scores (diagonal included)
        o_intra, PWk = (P @ W).split([V, K], dim=-1)  # one GEMM for both halves of W
        q_eff = q * G.exp().unsqueeze(-1) - PWk  # [B, H, N, Q, K] reads the entering state
        k_end = (k * (G[..., -1:] - G).exp().unsqueeze(-1)).transpose(-1, -2)  # [B, H, N, K, Q]
        C, kWk = (k_end @ W).split([V, K], dim=-1)  # [B, H, N, K, V], [B, H, N, K, K]
        eye = torch.eye(K, dtype=q.dtype, device=q.device)
        M = G[..., -1, None, None].exp() * eye - kWk  # [B, H, N, K, K] chunk transition

        # the only sequential part: one small matmul per chunk; starts [B, H, N, K, V]
        S, starts = scan_leading(lambda S, M, C: (M @ S + C, S), S, (M, C), dim=2)
        o = q_eff @ starts + o_intra  # [B, H, N, Q, V]
        return join_chunks(o, T, 2).transpose(1, 2), S


_kernels.register("delta_rule", ref=delta_rule_ref, torch_impl=delta_rule_chunked)


def delta_rule(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None = None, *,
    state: Tensor | None = None, scale: float | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """The (gated) delta rule on the selected backend; see the module docstring for the layout. A
    wrong shape raises ``ValueError`` naming the argument."""
    check = ShapeCheck("delta_rule")
    for name, t, dims in (("q", q, "BTHK"), ("k", k, "BTHK"), ("v", v, "BTHV"), ("beta", beta, "BTH"),
                          ("g", g, "BTH"), ("state", state, "BHKV")):
        check(name, t, dims)
    return _kernels.get("delta_rule", q.device)(
        q, k, v, beta, g, state=state, scale=scale, chunk_size=chunk_size
    )
