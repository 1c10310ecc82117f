"""Causal softmax attention with optional sliding window, global prefix and memory keys.

Layout: ``q, k, v [B, T, H, Dh]`` (time-major heads, as every op here); caches ``[B, H, N, Dh]``;
memory keys/values ``mem_k, mem_v [M, H, Dh]`` (learned, shared by the batch). Scale
``1/sqrt(Dh)``. Returns ``out [B, T, H, Dh]``.

Visibility (one convention everywhere, "W keys including self"): query ``i`` sees key ``j`` iff
``j <= i`` and (``window is None`` or ``i - j < window`` or ``j < num_prefix``). The first
``num_prefix`` positions are global (Hymba's meta tokens); the ``M`` memory keys are seen by every
query (they sit before position 0 and take no position).

Training forms (``attention``, ``impl=``):

* ``"sdpa"``: ``F.scaled_dot_product_attention`` (``is_causal`` when nothing else is needed).
* ``"chunked"``: query chunks of ``chunk_size`` against their causal keys, explicit softmax.
* ``"memory_efficient"``: online softmax over key chunks of ``chunk_size`` in a custom autograd
  Function that stores only ``out`` and the log-sum-exp and recomputes in the backward: O(T)
  memory (Rabe & Staats 2021, "Self-attention does not need O(n^2) memory"; FlashAttention).

With a window shorter than ``T`` every form costs O(T * (W + chunk + prefix)): queries in blocks of
``chunk_size`` against their band of ``chunk_size + W - 1`` keys plus the global keys, never a dense
``T x T`` mask (DESIGN §5). ``attention_cached`` is the streaming form: new queries of each row at
its own position ``pos[b]`` attend to the cache slots and to the new keys, then the new keys are
written into the cache (a ring of ``W`` slots with a window, else one slot per position).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._dtypes import acc_dtype
from hybridssm.ops._time import join_chunks, num_chunks, scan_leading, split_chunks, symbolic_length

__all__ = [
    "IMPLS",
    "attention",
    "attention_ref",
    "attention_cached",
    "attention_cached_ref",
    "cache_slot_positions",
]

IMPLS = ("sdpa", "chunked", "memory_efficient")
_NEG_INF = float("-inf")
_FULL_PIECE = 256  # queries per piece of a long prefill into a full-attention cache


def _check(window: int | None, num_prefix: int) -> None:
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive integer or None, got {window!r}")
    if not isinstance(num_prefix, int) or num_prefix < 0:
        raise ValueError(f"num_prefix must be a non-negative integer, got {num_prefix!r}")


def _mem_bhmd(mem: Tensor | None, B: int, dtype: torch.dtype | None = None) -> Tensor | None:
    """``[M, H, Dh]`` -> ``[B, H, M, Dh]`` (a broadcast view)."""
    if mem is None:
        return None
    m = mem.permute(1, 0, 2).unsqueeze(0).expand(B, -1, -1, -1)
    return m if dtype is None else m.to(dtype)


def _visible(i: Tensor, j: Tensor, window: int | None, num_prefix: int) -> Tensor:
    """The visibility rule on broadcastable query / key position tensors."""
    vis = j <= i
    if window is not None:
        vis = vis & ((i - j < window) | (j < num_prefix))
    return vis


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------
def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    num_prefix: int = 0,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
) -> Tensor:
    """Reference: a dense masked softmax in the wider of fp32 and the input dtype."""
    _check(window, num_prefix)
    B, T, H, D = q.shape
    acc = acc_dtype(q.dtype)
    qf, kf, vf = (x.to(acc).transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    pos = torch.arange(T, device=q.device)
    mask = _visible(pos[:, None], pos[None, :], window, num_prefix)  # (T, T)
    if mem_k is not None:
        kf = torch.cat([_mem_bhmd(mem_k, B, acc), kf], dim=2)
        vf = torch.cat([_mem_bhmd(mem_v, B, acc), vf], dim=2)
        mask = torch.cat([mask.new_ones(T, mem_k.shape[0]), mask], dim=1)
    s = (qf @ kf.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, M + T)
    p = torch.softmax(s.masked_fill(~mask, _NEG_INF), dim=-1)
    return (p @ vf).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# Sliding window in blocks: each block of Q queries sees its band of Q + W - 1 keys + global keys
# ------------------------------------------------------------------------------------------------
def _band_layout(
    q: Tensor, k: Tensor, v: Tensor, window: int, num_prefix: int, mk: Tensor | None,
    mv: Tensor | None, block: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Blocked operands: ``qb [B, H, nb, Q, D]``, ``kb, vb [B, H, nb, G + L, D]`` and the mask
    ``[nb, Q, G + L]``, with ``L = Q + W - 1`` band keys and ``G = M + min(P, T)`` global keys
    (memory, then the prefix keys, which the band leaves out so that none counts twice)."""
    B, H, T, D = q.shape
    W, Q = window, block
    nb = num_chunks(T, Q)
    Tp, L = nb * Q, Q + window - 1
    P = min(num_prefix, T)
    qb = split_chunks(F.pad(q, (0, 0, 0, Tp - T)), nb, Q, 2)

    dev = q.device
    a = torch.arange(Q, device=dev).view(1, Q, 1)
    c = torch.arange(L, device=dev).view(1, 1, L)
    n = torch.arange(nb, device=dev).view(nb, 1, 1)

    def band(x: Tensor) -> Tensor:
        # left pad W - 1 so block n's band starts at key n*Q - (W - 1); (B, H, nb, L, D)
        x = F.pad(x, (0, 0, W - 1, Tp - T))
        if symbolic_length(T):  # gathered: unfold's window count is a size torch cannot match to nb
            return x[:, :, (n * Q + c).view(nb, L)]
        return x.unfold(2, L, Q).transpose(-1, -2)
    j = n * Q - (W - 1) + c  # key position of band column c in block n
    # i - j = a - c + W - 1 in [0, W)  <=>  a <= c <= a + W - 1; j >= P drops pads and the prefix
    masks = [(c >= a) & (c <= a + W - 1) & (j >= num_prefix)]
    kparts, vparts = [band(k)], [band(v)]
    if P > 0:
        i = n * Q + a
        masks.insert(0, torch.arange(P, device=dev).view(1, 1, P) <= i)
        kparts.insert(0, k[:, :, :P].unsqueeze(2).expand(B, H, nb, P, D))
        vparts.insert(0, v[:, :, :P].unsqueeze(2).expand(B, H, nb, P, D))
    if mk is not None:
        M = mk.shape[2]
        masks.insert(0, torch.ones(nb, Q, M, dtype=torch.bool, device=dev))
        kparts.insert(0, mk.unsqueeze(2).expand(B, H, nb, M, D))
        vparts.insert(0, mv.unsqueeze(2).expand(B, H, nb, M, D))
    mask = torch.cat([m.expand(nb, Q, -1) for m in masks], dim=-1)
    return qb, torch.cat(kparts, dim=3), torch.cat(vparts, dim=3), mask


def _window_hides(T: int | torch.SymInt, window: int) -> bool:
    """Whether a window of ``window`` keys hides any key from ``T`` queries (``T > window``); always
    assumed while exporting a symbolic ``T`` (the banded form is right for every ``T``)."""
    return symbolic_length(T) or T > window


def _explicit_softmax_attn(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """``softmax(q k^T / sqrt(D) masked) v`` with the softmax in fp32 (at least)."""
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, _NEG_INF)
    p = torch.softmax(s, dim=-1, dtype=acc_dtype(s.dtype))
    return p.to(v.dtype) @ v


def _unblock(out: Tensor, T: int) -> Tensor:
    return join_chunks(out, T, 2)  # [B, H, nb, Q, D] -> [B, H, T, D]


# ------------------------------------------------------------------------------------------------
# sdpa and chunked forms (layout (B, H, T, D) inside)
# ------------------------------------------------------------------------------------------------
def _sdpa(q, k, v, window, num_prefix, mk, mv, chunk_size) -> Tensor:
    B, H, T, D = q.shape
    if window is not None and _window_hides(T, window):
        qb, kb, vb, mask = _band_layout(q, k, v, window, num_prefix, mk, mv, chunk_size)
        if symbolic_length(T):
            # export with a symbolic T: one block at a time through a scan, so that no matmul folds
            # the symbolic block count into its batch (torch cannot prove such reshapes and pins T)
            def block(c: Tensor, q: Tensor, k: Tensor, v: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
                return c, _explicit_softmax_attn(q, k, v, m)

            m = mask.expand(B, H, *mask.shape)  # [B, H, nb, Q, G + L]
            return _unblock(scan_leading(block, q.new_zeros(()), (qb, kb, vb, m), dim=2)[1], T)
        nb = qb.shape[2]
        out = F.scaled_dot_product_attention(
            qb.reshape(B * H, nb, chunk_size, D),
            kb.reshape(B * H, nb, kb.shape[3], D),
            vb.reshape(B * H, nb, kb.shape[3], D),
            attn_mask=mask,
        )
        return _unblock(out.view(B, H, nb, chunk_size, D), T)
    # T <= W: the window hides nothing and the prefix rule changes nothing
    if mk is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    M = mk.shape[2]
    i = torch.arange(T, device=q.device)
    mask = torch.cat([i.new_ones(T, M, dtype=torch.bool), i[None, :] <= i[:, None]], dim=1)
    return F.scaled_dot_product_attention(
        q, torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2), attn_mask=mask
    )


def _chunked(q, k, v, window, num_prefix, mk, mv, chunk_size) -> Tensor:
    B, H, T, D = q.shape
    if window is not None and T > window:
        qb, kb, vb, mask = _band_layout(q, k, v, window, num_prefix, mk, mv, chunk_size)
        return _unblock(_explicit_softmax_attn(qb, kb, vb, mask), T)
    M = 0 if mk is None else mk.shape[2]
    if M:
        k, v = torch.cat([mk, k], dim=2), torch.cat([mv, v], dim=2)
    outs = []
    for a in range(0, T, chunk_size):  # a loop over chunks, not timesteps
        b = min(a + chunk_size, T)
        i = torch.arange(a, b, device=q.device).view(-1, 1)
        c = torch.arange(M + b, device=q.device).view(1, -1)
        mask = (c < M) | (c - M <= i)
        outs.append(_explicit_softmax_attn(q[:, :, a:b], k[:, :, : M + b], v[:, :, : M + b], mask))
    return torch.cat(outs, dim=2)


# ------------------------------------------------------------------------------------------------
# memory-efficient form: online softmax over key chunks, recomputed in the backward
# ------------------------------------------------------------------------------------------------
def _key_chunks(T: int, M: int, window: int | None, P: int, C: int):
    """Static plan: ``(k0, k1, q0, q1, needs_mask)`` over the keys ``[memory, sequence]``; the
    queries ``q0:q1`` are the only ones that can see keys ``k0:k1``."""
    plan = []
    if M:
        plan.append((0, M, 0, T, False))
    for j0 in range(0, T, C):
        j1 = min(j0 + C, T)
        q1 = T if window is None or j0 < P else min(T, j1 - 1 + window)
        full = j1 - 1 <= j0 and (window is None or q1 - 1 - j0 < window or j1 <= P)
        plan.append((M + j0, M + j1, j0, q1, not full))
    return plan


def _chunk_mask(k0, k1, q0, q1, M, window, P, device) -> Tensor:
    i = torch.arange(q0, q1, device=device).view(-1, 1)
    j = torch.arange(k0 - M, k1 - M, device=device).view(1, -1)
    return _visible(i, j, window, P)


class _MemoryEfficientAttention(torch.autograd.Function):
    """``q [B, H, T, D]``, ``k, v [B, H, M + T, D]`` (memory keys first). Saves q, k, v, the output
    and the log-sum-exp; the backward recomputes the probabilities chunk by chunk."""

    @staticmethod
    def forward(ctx, q, k, v, window, num_prefix, num_mem, chunk_size):
        B, H, T, D = q.shape
        acc = acc_dtype(q.dtype)
        scale = D**-0.5
        m = q.new_full((B, H, T), _NEG_INF, dtype=acc)  # running max
        l = q.new_zeros((B, H, T), dtype=acc)  # running normaliser
        o = q.new_zeros((B, H, T, D), dtype=acc)  # running numerator
        plan = _key_chunks(T, num_mem, window, num_prefix, chunk_size)
        for k0, k1, q0, q1, needs_mask in plan:
            s = (q[:, :, q0:q1].to(acc) @ k[:, :, k0:k1].to(acc).transpose(-1, -2)) * scale
            if needs_mask:
                mask = _chunk_mask(k0, k1, q0, q1, num_mem, window, num_prefix, q.device)
                s = s.masked_fill(~mask, _NEG_INF)
            m_old = m[:, :, q0:q1]
            m_new = torch.maximum(m_old, s.amax(-1))  # finite: every query in range sees a key
            corr = torch.exp(m_old - m_new)
            p = torch.exp(s - m_new.unsqueeze(-1))
            l[:, :, q0:q1] = l[:, :, q0:q1] * corr + p.sum(-1)
            o[:, :, q0:q1] = o[:, :, q0:q1] * corr.unsqueeze(-1) + p @ v[:, :, k0:k1].to(acc)
            m[:, :, q0:q1] = m_new
        out = (o / l.unsqueeze(-1)).to(q.dtype)
        lse = m + torch.log(l)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.window, ctx.num_prefix, ctx.num_mem = plan, window, num_prefix, num_mem
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        D = q.shape[-1]
        acc = acc_dtype(q.dtype)
        scale = D**-0.5
        qa, ka, va, doa = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
        delta = (doa * out.to(acc)).sum(-1)  # (B, H, T): rowsum(dO * O)
        dq = torch.zeros_like(qa)
        dk = torch.zeros_like(ka)
        dv = torch.zeros_like(va)
        for k0, k1, q0, q1, needs_mask in ctx.plan:
            qs, dos, kc, vc = qa[:, :, q0:q1], doa[:, :, q0:q1], ka[:, :, k0:k1], va[:, :, k0:k1]
            p = torch.exp((qs @ kc.transpose(-1, -2)) * scale - lse[:, :, q0:q1].unsqueeze(-1))
            if needs_mask:
                mask = _chunk_mask(k0, k1, q0, q1, ctx.num_mem, ctx.window, ctx.num_prefix, q.device)
                p = p.masked_fill(~mask, 0.0)
            dv[:, :, k0:k1] = p.transpose(-1, -2) @ dos
            ds = p * (dos @ vc.transpose(-1, -2) - delta[:, :, q0:q1].unsqueeze(-1))
            dq[:, :, q0:q1] += (ds @ kc) * scale
            dk[:, :, k0:k1] = (ds.transpose(-1, -2) @ qs) * scale
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _memory_efficient(q, k, v, window, num_prefix, mk, mv, chunk_size) -> Tensor:
    M = 0 if mk is None else mk.shape[2]
    if M:
        k, v = torch.cat([mk.to(k.dtype), k], dim=2), torch.cat([mv.to(v.dtype), v], dim=2)
    if window is not None and q.shape[2] <= window:
        window = None  # the window hides nothing
    return _MemoryEfficientAttention.apply(q, k, v, window, num_prefix, M, chunk_size)


_FORMS = {"sdpa": _sdpa, "chunked": _chunked, "memory_efficient": _memory_efficient}


def attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    num_prefix: int = 0,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    impl: str = "sdpa",
    chunk_size: int = 32,
) -> Tensor:
    """The fast forms; ``impl`` picks one of :data:`IMPLS`."""
    _check(window, num_prefix)
    if impl not in _FORMS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    B = q.shape[0]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    mk, mv = _mem_bhmd(mem_k, B, k.dtype), _mem_bhmd(mem_v, B, v.dtype)
    # The chunked and memory-efficient forms loop over chunks of T: an export with a symbolic T
    # takes the sdpa form (the same values; a banded window, never a T x T mask with one).
    form = _sdpa if symbolic_length(q.shape[1]) else _FORMS[impl]
    out = form(qt, kt, vt, window, num_prefix, mk, mv, chunk_size)
    return out.transpose(1, 2)


def _attention_ref_dispatch(q, k, v, *, impl="sdpa", chunk_size=32, **kw) -> Tensor:
    return attention_ref(q, k, v, **kw).to(q.dtype)


_kernels.register("attention", ref=_attention_ref_dispatch, torch_impl=attention_torch)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int | None = None,
    num_prefix: int = 0,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    impl: str = "sdpa",
    chunk_size: int = 32,
) -> Tensor:
    """Causal attention ``[B, T, H, Dh] -> [B, T, H, Dh]``; see the module docstring."""
    return _kernels.get("attention", q.device)(
        q, k, v, window=window, num_prefix=num_prefix, mem_k=mem_k, mem_v=mem_v, impl=impl,
        chunk_size=chunk_size,
    )


# ------------------------------------------------------------------------------------------------
# Cached (streaming) form
# ------------------------------------------------------------------------------------------------
def cache_slot_positions(
    pos: Tensor, num_slots: int, num_prefix: int, window: int | None
) -> tuple[Tensor, Tensor]:
    """Input position held by each cache slot, and whether the slot is filled, for rows that have
    consumed ``pos [B]`` tokens: ``([B, N], [B, N] bool)``. Slots ``0..P-1`` hold positions
    ``0..P-1``; then slot ``P + s`` holds position ``P + s`` (full) or the latest position
    ``p < pos`` with ``(p - P) % W == s`` (a ring)."""
    s = torch.arange(num_slots, device=pos.device).unsqueeze(0)  # (1, N)
    if window is None:
        return s.expand(pos.shape[0], -1), s < pos.unsqueeze(1)
    last = pos.unsqueeze(1) - 1
    ring = last - (last - s).remainder(window)  # latest p <= last with p = s (mod W)
    is_prefix = s < num_prefix
    # the mask as logic, not a where over bools (onnxruntime has no bool Where)
    filled = (is_prefix & (s <= last)) | (~is_prefix & (ring >= num_prefix))
    return torch.where(is_prefix, s, ring), filled


def _cache_write(
    ck: Tensor, cv: Tensor, k: Tensor, v: Tensor, pos: Tensor, lengths: Tensor, num_prefix: int,
    window: int | None, inplace: bool,
) -> tuple[Tensor, Tensor]:
    """Write the valid new keys ``k, v [B, H, T, D]`` (row ``b``: the first ``lengths[b]``) at
    positions ``pos[b] + t`` into ``ck, cv [B, H, N, D]``. O(T) indices (O(1) for a step when
    ``inplace``); deterministic and differentiable (each slot's gradient flows once)."""
    B, H, T, D = k.shape
    N, P = ck.shape[2], num_prefix
    if T == 1:  # a step: its one token is valid (lengths are in 1..T) and owns its slot
        p = pos
        if window is None:
            target = p.clamp(max=N - 1)
        else:
            target = torch.where(p < P, p, P + (p - P).remainder(window))
        idx = target.view(B, 1, 1, 1).expand(B, H, 1, D)
        return tuple(
            buf.scatter_(2, idx, new.to(buf.dtype)) if inplace else buf.scatter(2, idx, new.to(buf.dtype))
            for buf, new in ((ck, k), (cv, v))
        )
    t = torch.arange(T, device=pos.device)
    p = pos.unsqueeze(1) + t  # (B, T) positions of the new tokens
    if window is None:
        target = p.clamp(max=N - 1)  # past capacity: checked in eager mode by the mixer
        carrier = (p < N) | (t == T - 1)
    else:
        target = torch.where(p < P, p, P + (p - P).remainder(window))
        carrier = (p < P) | (t >= T - window)  # the last token that maps to its slot
    # Which new token a target slot ends up holding (if any): the last valid one mapping to it.
    end = (pos + lengths - 1).unsqueeze(1)
    if window is None:
        win_p = target
    else:
        ring = end - (end - target).remainder(window)
        win_p = torch.where(target < P, target, ring)
    win_t = win_p - pos.unsqueeze(1)
    exists = (win_t >= 0) & (win_t < lengths.unsqueeze(1))
    if window is not None:
        exists = exists & ((target < P) | (win_p >= P))
    idx = target.view(B, 1, T, 1).expand(B, H, T, D)
    widx = win_t.clamp(0, T - 1).view(B, 1, T, 1).expand(B, H, T, D)
    e, c = exists.view(B, 1, T, 1), carrier.view(B, 1, T, 1)
    out = []
    for buf, new in ((ck, k), (cv, v)):
        val = torch.where(e, new.gather(2, widx).to(buf.dtype), buf.gather(2, idx))
        # Tokens sharing a slot all write its final value; only one carries its gradient.
        val = torch.where(c, val, val.detach())
        out.append(buf.scatter_(2, idx, val) if inplace else buf.scatter(2, idx, val))
    return out[0], out[1]


def _cached_masks(
    pos: Tensor, T: int, N: int, num_prefix: int, window: int | None
) -> tuple[Tensor, Tensor]:
    """``old [B, T, N]``: query t sees cache slot n; ``new [B, T, T]``: query t sees new key t'."""
    slot_pos, filled = cache_slot_positions(pos, N, num_prefix, window)
    t = torch.arange(T, device=pos.device)
    qpos = pos.view(-1, 1, 1) + t.view(1, T, 1)  # (B, T, 1)
    if window is None:  # every filled slot holds an earlier position
        old = filled.unsqueeze(1)
    else:
        old = filled.unsqueeze(1) & _visible(qpos, slot_pos.unsqueeze(1), window, num_prefix)
    new = _visible(qpos, (pos.view(-1, 1) + t).unsqueeze(1), window, num_prefix)
    return old, new


def _repeat_kv(q_heads: Tensor, k, v, ck, cv, mk, mv, kv_dim: int, mem_dim: int):
    """Grouped-query attention: each of the ``Hk`` key/value heads (cache, new keys, memory) serves
    ``H / Hk`` consecutive query heads; repeated here so the attend below stays per head."""
    g = q_heads // ck.shape[1]
    if g == 1:
        return k, v, ck, cv, mk, mv
    k, v = k.repeat_interleave(g, dim=kv_dim), v.repeat_interleave(g, dim=kv_dim)
    ck, cv = ck.repeat_interleave(g, dim=1), cv.repeat_interleave(g, dim=1)
    if mk is not None:
        mk, mv = mk.repeat_interleave(g, dim=mem_dim), mv.repeat_interleave(g, dim=mem_dim)
    return k, v, ck, cv, mk, mv


def _cached_attend_ref(q, k, v, ck, cv, pos, window, num_prefix, mem_k, mem_v) -> Tensor:
    B, T, H, D = q.shape
    k, v, ck, cv, mem_k, mem_v = _repeat_kv(H, k, v, ck, cv, mem_k, mem_v, 2, 1)
    acc = acc_dtype(q.dtype)
    old, new = _cached_masks(pos, T, ck.shape[2], num_prefix, window)
    keys = [ck.to(acc), k.to(acc).transpose(1, 2)]
    vals = [cv.to(acc), v.to(acc).transpose(1, 2)]
    masks = [old, new]
    if mem_k is not None:
        keys.insert(0, _mem_bhmd(mem_k, B, acc))
        vals.insert(0, _mem_bhmd(mem_v, B, acc))
        masks.insert(0, old.new_ones(B, T, mem_k.shape[0]))
    s = (q.to(acc).transpose(1, 2) @ torch.cat(keys, 2).transpose(-1, -2)) / math.sqrt(D)
    masks = [m.expand(B, T, -1) for m in masks]
    s = s.masked_fill(~torch.cat(masks, -1).unsqueeze(1), _NEG_INF)
    return (torch.softmax(s, dim=-1) @ torch.cat(vals, 2)).transpose(1, 2)


def _lengths_or_full(lengths: Tensor | None, pos: Tensor, T: int) -> Tensor:
    return torch.full_like(pos, T) if lengths is None else lengths.to(pos.dtype)


def attention_cached_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    pos: Tensor,
    *,
    window: int | None = None,
    num_prefix: int = 0,
    lengths: Tensor | None = None,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    inplace: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Reference streaming form: one dense masked softmax over ``[memory, cache, new keys]`` in
    fp32 (at least), then the write. Returns ``(out [B, T, H, Dh], (cache_k, cache_v, pos))``."""
    _check(window, num_prefix)
    L = _lengths_or_full(lengths, pos, q.shape[1])
    out = _cached_attend_ref(q, k, v, cache_k, cache_v, pos, window, num_prefix, mem_k, mem_v)
    ck, cv = _cache_write(
        cache_k, cache_v, k.transpose(1, 2), v.transpose(1, 2), pos, L, num_prefix, window, inplace
    )
    return out, (ck, cv, pos + L)


def _cached_attend(q, k, v, ck, cv, pos, window, num_prefix, mk, mv) -> Tensor:
    """Fast streaming attention, ``q, k, v [B, H, T, D]``: scores against the cache and the new
    keys separately (no copy of the cache), one softmax in fp32 (at least)."""
    T = q.shape[2]
    k, v, ck, cv, mk, mv = _repeat_kv(q.shape[1], k, v, ck, cv, mk, mv, 1, 1)
    old, new = _cached_masks(pos, T, ck.shape[2], num_prefix, window)
    scale = q.shape[-1] ** -0.5
    qc = q.to(ck.dtype)
    s_old = (qc @ ck.transpose(-1, -2)).masked_fill(~old.unsqueeze(1), _NEG_INF)
    s_new = q @ k.transpose(-1, -2)
    if T > 1:  # a single new token always sees itself
        s_new = s_new.masked_fill(~new.unsqueeze(1), _NEG_INF)
    parts = [s_old, s_new.to(s_old.dtype)]
    if mk is not None:
        parts.insert(0, (qc @ mk.to(ck.dtype).transpose(-1, -2)))
    s = torch.cat(parts, dim=-1) * scale
    p = torch.softmax(s, dim=-1, dtype=acc_dtype(s.dtype))
    sizes = [x.shape[-1] for x in parts]
    ps = p.split(sizes, dim=-1)
    out = ps[-1].to(v.dtype) @ v
    out = out + ps[-2].to(cv.dtype) @ cv
    if mk is not None:
        out = out + ps[0].to(mv.dtype) @ mv.to(cv.dtype)
    return out


def attention_cached_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    pos: Tensor,
    *,
    window: int | None = None,
    num_prefix: int = 0,
    lengths: Tensor | None = None,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    inplace: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Fast streaming form. A long chunk goes in pieces (each attends to the cache, then is
    written into it): ``max(W, 32)`` tokens for a ring, so a prefill costs O(T * (W + P)) rather
    than O(T^2); 256 for a full cache, so a long prefill keeps its scores to 256 x (N + 256)."""
    _check(window, num_prefix)
    B, T, H, D = q.shape
    L = _lengths_or_full(lengths, pos, T)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    mk, mv = _mem_bhmd(mem_k, B), _mem_bhmd(mem_v, B)
    piece = _FULL_PIECE if window is None else max(window, 32)
    outs, ck, cv, p = [], cache_k, cache_v, pos
    for a in range(0, T, piece):  # a loop over pieces of a chunk, not timesteps
        b = min(a + piece, T)
        Lp = (L - a).clamp(0, b - a)
        outs.append(_cached_attend(qt[:, :, a:b], kt[:, :, a:b], vt[:, :, a:b], ck, cv, p, window,
                                   num_prefix, mk, mv))
        ck, cv = _cache_write(ck, cv, kt[:, :, a:b], vt[:, :, a:b], p, Lp, num_prefix, window,
                              inplace)
        p = p + Lp
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2), (ck, cv, p)


_kernels.register("attention_cached", ref=attention_cached_ref, torch_impl=attention_cached_torch)


def attention_cached(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache_k: Tensor,
    cache_v: Tensor,
    pos: Tensor,
    *,
    window: int | None = None,
    num_prefix: int = 0,
    lengths: Tensor | None = None,
    mem_k: Tensor | None = None,
    mem_v: Tensor | None = None,
    inplace: bool = False,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Streaming attention for ``T`` new tokens of each row at positions ``pos[b] + t``.

    Args:
        q, k, v: ``[B, T, H, Dh]`` (keys already rotated for their positions); ``k, v`` may have
            ``Hk`` heads dividing ``H`` (grouped-query attention; the cache then has ``Hk``).
        cache_k, cache_v: ``[B, Hk, P + S, Dh]``; slots as in :func:`cache_slot_positions`.
        pos: ``[B]`` int64, tokens each row has consumed (prefix tokens included).
        lengths: ``[B]`` valid new tokens per row (right padding); only those are written.
        inplace: write into ``cache_k, cache_v`` (O(T) copies) instead of new buffers.

    Returns ``(out [B, T, H, Dh], (cache_k, cache_v, pos + lengths))``. Capacity is not checked
    here (the mixer checks it in eager mode); a full cache clamps writes to its last slot.
    """
    return _kernels.get("attention_cached", q.device)(
        q, k, v, cache_k, cache_v, pos, window=window, num_prefix=num_prefix, lengths=lengths,
        mem_k=mem_k, mem_v=mem_v, inplace=inplace,
    )
