"""Mamba-2's state-space duality (SSD) scan: a scalar-decay selective SSM per head.

Layout: ``x [B, T, H, P]``, ``dt [B, T, H]`` (already ``softplus(dt + dt_bias)``, >= 0), ``A [H]``
(negative), ``B, C [B, T, G, N]`` shared by groups of heads (head ``h`` uses group ``h // (H // G)``:
``repeat_interleave`` semantics), ``D [H]`` or None, ``state [B, H, P, N]`` or None (zeros).
Per head, with ``h_t [P, N]``::

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T
    y_t = h_t C_t + D x_t

Returns ``(y [B, T, H, P], h_T [B, H, P, N])``, both in the wider of fp32 and ``x``'s dtype.

The fast form (:func:`ssd_chunked`) is the chunked matmul algorithm of Mamba-2 (Dao & Gu, "Transformers
are SSMs", 2024, §6 / ``ssd_minimal``): within a chunk the output is attention-like
``(L o C B^T) X`` with ``X = x * dt`` and ``L = exp(segsum(dt A))``; each chunk's contribution to the
state, a scan over chunk boundaries from the initial state, and the off-diagonal term ``C . state``
are matmuls too. ``T == 1`` takes the direct recurrence (the streaming step).

Backends (``hybridssm.ops._kernels``, op name ``ssd``): ``ref`` (:func:`ssd_ref`), ``torch``
(:func:`ssd_chunked`) and ``fused`` (:func:`ssd_fused`, CPU): the recurrence in C++, one pass over
time per (batch row, head) with the ``[P, N]`` state in L1 and one ``exp`` per step and head; it
reads ``x``, ``B`` and ``C`` through their strides (views of the conv output, no copies) and its
backward recomputes each 32-step chunk from a checkpoint. With small ``N`` (16) the recurrence does
fewer FLOPs than the chunked form's ``Q x Q`` blocks (``Q = 64``); the README's Mamba-2 benchmark
has the measured ratio.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._checks import ShapeCheck
from hybridssm.ops._dtypes import acc_dtype
from hybridssm.ops._time import join_chunks, num_chunks, symbolic_length
from hybridssm.ops.mamba2_fused import FUSED_DTYPES, fused_probe, ssd_fwd

__all__ = ["ssd", "ssd_ref", "ssd_chunked", "ssd_fused", "DEFAULT_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 64


def _init_state(x: Tensor, N: int, state: Tensor | None, acc: torch.dtype) -> Tensor:
    if state is None:
        Bsz, _, H, P = x.shape
        return x.new_zeros(Bsz, H, P, N, dtype=acc)
    return state.to(acc)


def ssd_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    state: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence one timestep at a time (``chunk_size`` is ignored)."""
    acc = acc_dtype(x.dtype)
    H, G = x.shape[2], B.shape[2]
    # Head h reads group h // (H // G).
    Bh = B.to(acc).repeat_interleave(H // G, dim=2)  # [B, T, H, N]
    Ch = C.to(acc).repeat_interleave(H // G, dim=2)
    x, dt, A = x.to(acc), dt.to(acc), A.to(acc)
    h = _init_state(x, B.shape[-1], state, acc)  # [B, H, P, N]
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)  # [B, H]
        inp = (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * Bh[:, t].unsqueeze(-2)  # [B, H, P, N]
        h = decay[:, :, None, None] * h + inp
        y = (h * Ch[:, t].unsqueeze(-2)).sum(-1)  # [B, H, P]
        if D is not None:
            y = y + D.to(acc)[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), h


def _tril_masks(Q: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(strictly lower, lower) triangular bool masks ``[Q, Q]``."""
    # Comparisons of aranges, not torch.tril: tril always forks the thread pool, which costs
    # milliseconds per call on a busy machine.
    i = torch.arange(Q, device=device)
    return i[:, None] > i[None, :], i[:, None] >= i[None, :]


def _decay_matrix(a: Tensor) -> Tensor:
    """``[..., Q] -> [..., Q, Q]``: ``L[i, j] = exp(sum_{j < k <= i} a_k)`` for ``i >= j``, 0 above.

    The stable segment sum: the terms are summed directly (no difference of cumulative sums, which
    loses the small exponents next to the diagonal after a long strong decay) and the upper
    triangle is masked to ``-inf`` before the ``exp``."""
    Q = a.shape[-1]
    strict, lower = _tril_masks(Q, a.device)
    terms = a.unsqueeze(-1).expand(*a.shape, Q).masked_fill(~strict, 0.0)  # [..., k, j] = a_k, k > j
    seg = torch.cumsum(terms, dim=-2)  # [..., i, j] = sum_{j < k <= i} a_k
    return seg.masked_fill_(~lower, float("-inf")).exp_()


class _IntraChunk(torch.autograd.Function):
    """The diagonal blocks ``Y = (L o C B^T) X`` of every chunk, with a hand-written backward.

    ``X [Bz, nc, G, R, Q, P]``, ``a [Bz, nc, G, R, Q]`` (``dt A``), ``B, C [Bz, nc, G, Q, N]``.
    The backward needs two passes over the ``[Q, Q]`` blocks where autograd through the segment
    sum takes about ten: with ``Z = dL o L`` (zero diagonal), ``d acs = rowsum Z - colsum Z`` and
    ``da`` is its reverse cumulative sum.
    """

    @staticmethod
    def forward(ctx, X: Tensor, a: Tensor, B: Tensor, C: Tensor) -> Tensor:
        L = _decay_matrix(a)  # [Bz, nc, G, R, Q, Q]
        CB = torch.matmul(C, B.transpose(-1, -2)).unsqueeze(3)  # [Bz, nc, G, 1, Q, Q]
        M = L * CB
        ctx.save_for_backward(X, B, C, CB, L, M)
        return torch.matmul(M, X)  # [Bz, nc, G, R, Q, P]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dY: Tensor):
        X, B, C, CB, L, M = ctx.saved_tensors
        dM = torch.matmul(dY, X.transpose(-1, -2))  # [Bz, nc, G, R, Q, Q]
        dX = torch.matmul(M.transpose(-1, -2), dY)
        Z = dM.mul_(L)  # dM o L
        dCB = Z.sum(3)  # [Bz, nc, G, Q, Q], summed over the group's heads
        Z.mul_(CB).diagonal(dim1=-2, dim2=-1).zero_()  # dL o L; the diagonal (exp(0)) has no input
        dacs = Z.sum(-1) - Z.sum(-2)  # [..., Q]
        da = dacs.flip(-1).cumsum(-1).flip(-1)  # acs = cumsum(a)
        dB = torch.matmul(dCB.transpose(-1, -2), C)
        dC = torch.matmul(dCB, B)
        return dX, da, dB, dC


def _ssd_step(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h: Tensor
) -> tuple[Tensor, Tensor]:
    """One timestep (``T == 1``), grouped: ``x [B, 1, H, P]`` -> ``(y [B, 1, H, P], h [B, H, P, N])``."""
    Bsz, _, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    x1, dt1 = x[:, 0], dt[:, 0]  # [B, H, P], [B, H]
    decay = torch.exp(dt1 * A)  # [B, H]
    xdt = (x1 * dt1.unsqueeze(-1)).view(Bsz, G, R, P, 1)
    inp = xdt * B[:, 0].reshape(Bsz, G, 1, 1, N)  # [B, G, R, P, N]
    h = decay[:, :, None, None] * h + inp.view(Bsz, H, P, N)
    y = torch.matmul(h.view(Bsz, G, R * P, N), C[:, 0].reshape(Bsz, G, N, 1)).view(Bsz, 1, H, P)
    if D is not None:
        y = y + D[:, None] * x
    return y, h


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    state: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Fast form: the chunked matmul algorithm (chunks of at most ``chunk_size``), fp32 inside.

    Chunks are balanced: ``T`` splits into ``ceil(T / chunk_size)`` chunks of equal length ``Q``;
    the tail is padded with ``X = 0`` and ``dt A = 0`` (identity steps) after discretising, so the
    final state is exact. Autocast is off inside: every product accumulates in fp32.
    """
    acc = acc_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        x, dt, A, B, C = x.to(acc), dt.to(acc), A.to(acc), B.to(acc), C.to(acc)
        D = D.to(acc) if D is not None else None
        if x.shape[1] == 1:
            return _ssd_step(x, dt, A, B, C, D, _init_state(x, B.shape[-1], state, acc))
        h0 = state.to(acc) if state is not None else None
        return _ssd_chunks(x, dt, A, B, C, D, h0, chunk_size)


def _ssd_chunks(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, h0: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    R = H // G
    symbolic = symbolic_length(T)  # exporting a dynamic T: whole chunks of chunk_size, always padded
    nc = num_chunks(T, chunk_size)
    Q = chunk_size if symbolic else -(-T // nc)  # balanced chunks: the least padding for this count
    pad = nc * Q - T
    F = torch.nn.functional

    # 1. Discretise, then pad the tail with identity steps (X = 0, dt A = 0, B = C = 0).
    X = x * dt.unsqueeze(-1)  # [B, T, H, P]
    a = dt * A  # [B, T, H]
    if symbolic or pad:
        X = F.pad(X, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    # Heads h = g * R + r; chunk layout [B, nc, G, ...] so a group's B and C serve its R heads.
    X = X.view(Bsz, nc, Q, G, R, P).permute(0, 1, 3, 4, 2, 5).contiguous()  # [B, nc, G, R, Q, P]
    a = a.view(Bsz, nc, Q, G, R).permute(0, 1, 3, 4, 2)  # [B, nc, G, R, Q]
    Bc = B.reshape(Bsz, nc, Q, G, N).transpose(2, 3)  # [B, nc, G, Q, N]
    Cc = C.reshape(Bsz, nc, Q, G, N).transpose(2, 3)  # [B, nc, G, Q, N]

    # 2. Intra-chunk (diagonal blocks): Y = (L o C B^T) X, L[i, j] = exp(sum_{j<k<=i} a_k).
    Y = _IntraChunk.apply(X, a, Bc, Cc)  # [B, nc, G, R, Q, P]

    # 3. Each chunk's own end state: sum_l w_l X_l B_l^T with w_l = exp(sum_{k>l} a_k), the
    #    suffix sums taken directly (exact, like the segment sum).
    suffix = F.pad(a[..., 1:], (0, 1)).flip(-1).cumsum(-1).flip(-1)  # [B, nc, G, R, Q]
    wB = torch.exp(suffix).unsqueeze(-1) * Bc.unsqueeze(3)  # [B, nc, G, R, Q, N]
    S = torch.matmul(X.transpose(-1, -2), wB)  # [B, nc, G, R, P, N]

    if h0 is None and not symbolic and nc == 1:  # training from a zero state: no carried-in state to read
        y, h_final = Y, S.view(Bsz, H, P, N)
    else:
        # 4. Scan over chunk boundaries from the initial state, as one matmul with the chunk
        #    segment sum.
        acs = torch.cumsum(a, dim=-1)  # [B, nc, G, R, Q], within-chunk decay exponents
        tot = F.pad(acs[..., -1].reshape(Bsz, nc, H).transpose(1, 2), (1, 0))  # [B, H, nc + 1]
        Lc = _decay_matrix(tot)  # [B, H, nc + 1, nc + 1]
        S = S.reshape(Bsz, nc, H, P * N)
        init = h0.reshape(Bsz, 1, H, P * N) if h0 is not None else torch.zeros_like(S[:, :1])
        S = torch.cat([init, S], dim=1).transpose(1, 2)  # [B, H, nc + 1, P*N]
        starts = torch.matmul(Lc, S)  # [B, H, nc + 1, P*N]: each chunk's start state, then the final
        h_final = starts[:, :, -1].view(Bsz, H, P, N)

        # 5. Off-diagonal blocks: the chunk's start state read by C, decayed to position l.
        S0 = starts[:, :, :-1].reshape(Bsz, G, R, nc, P, N).permute(0, 3, 1, 2, 5, 4)  # [.., R, N, P]
        eC = torch.exp(acs).unsqueeze(-1) * Cc.unsqueeze(3)  # [B, nc, G, R, Q, N]
        y = Y + torch.matmul(eC, S0)  # [B, nc, G, R, Q, P]
    y = join_chunks(y.permute(0, 1, 4, 2, 3, 5), T, 1).reshape(Bsz, T, H, P)  # [B, T, H, P]
    if D is not None:
        y = torch.addcmul(y, D[:, None], x)
    return y, h_final


def _inner_contiguous(t: Tensor) -> Tensor:
    return t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()


def ssd_fused(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    state: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Fused CPU kernel: the recurrence in C++ (``chunk_size`` is not used), fp32 / fp64 inside.

    ``x``, ``B``, ``C`` may be strided views with a contiguous last dim; nothing is copied then."""
    acc = acc_dtype(x.dtype)
    if acc not in FUSED_DTYPES:
        return ssd_chunked(x, dt, A, B, C, D=D, state=state, chunk_size=chunk_size)
    with torch.autocast(x.device.type, enabled=False):
        x, B, C = (_inner_contiguous(t.to(acc)) for t in (x, B, C))
        Bsz, _, H, P = x.shape
        dt, A = dt.to(acc).contiguous(), A.to(acc).contiguous()
        Dv = D.to(acc).contiguous() if D is not None else x.new_zeros(H)
        h0 = state.to(acc).contiguous() if state is not None else x.new_zeros(Bsz, H, P, B.shape[-1])
        save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, dt, A, B, C, Dv, h0))
        y, hT, _ = ssd_fwd(x, dt, A, B, C, Dv, h0, save)
    return y, hT


_kernels.register("ssd", ref=ssd_ref, torch_impl=ssd_chunked, fused=ssd_fused, fused_probe=fused_probe)


def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    D: Tensor | None = None,
    state: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """The SSD scan; see the module docstring for the layout. A wrong shape raises ``ValueError``
    naming the argument."""
    check = ShapeCheck("ssd")
    for name, t, dims in (("x", x, "BTHP"), ("dt", dt, "BTH"), ("A", A, "H"), ("B", B, "BTGN"),
                          ("C", C, "BTGN"), ("D", D, "H"), ("state", state, "BHPN")):
        check(name, t, dims)
    H, G = check.sizes["H"], check.sizes["G"]
    check.require(G >= 1 and H % G == 0, f"the groups of B and C ({G}) must divide the heads of x ({H})")
    return _kernels.get("ssd", x.device)(x, dt, A, B, C, D=D, state=state, chunk_size=chunk_size)
