"""Selective scan (Mamba-1, S6; Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", Algorithm 2).

Layout: ``u, delta, z [B, T, Dn]`` (Dn = d_inner), ``A [Dn, N]``, ``B, C [B, T, N]``, ``D [Dn]``,
``delta_bias [Dn]``, ``state [B, Dn, N]`` (the reference layout). With
``delta <- softplus(delta + delta_bias)`` when asked::

    h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t        # [B, Dn, N]
    y_t = C_t . h_t + D * u_t                               # [B, Dn]
    y   = y * silu(z)                                       # when z is given

Returns ``(y [B, T, Dn], h_T [B, Dn, N])``, both in the wider of fp32 and the input dtype. A row whose
padding must not move its state passes ``delta = 0`` there (after the softplus): an identity step.

Backends (``hybridssm.ops._kernels``, op name ``selective_scan``):

* ``ref``: the recurrence, one timestep at a time.
* ``torch``: chunks of ``TORCH_CHUNK`` steps, each a log-depth (Hillis-Steele) scan of the
  discretised pairs; only one chunk's ``[B, Q, Dn, N]`` tensors live at a time in the forward.
* ``fused``: a C++ kernel (``csrc/selective_scan.cpp``), a ``torch.library`` custom op with a fake
  implementation and autograd. One exp per (t, d, n), the state in registers; its backward recomputes
  each chunk from per-chunk checkpoints instead of storing ``[B, T, Dn, N]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._checks import ShapeCheck
from hybridssm.ops._cpu_ext import kernel_probe, load_extension
from hybridssm.ops._custom_op import Backward, kernel_op
from hybridssm.ops._dtypes import acc_dtype
from hybridssm.ops._time import scan_time_chunks
from hybridssm.ops.linear_rnn import linear_rnn_torch

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_torch", "selective_scan_fused"]

TORCH_CHUNK = 64  # chunk length of the pure-PyTorch form
FUSED_CHECKPOINT = 32  # must equal kChunk in csrc/selective_scan.cpp


def _discretise_delta(delta: Tensor, delta_bias: Tensor | None, softplus: bool, acc) -> Tensor:
    delta = delta.to(acc)
    if delta_bias is not None:
        delta = delta + delta_bias.to(acc)
    return F.softplus(delta) if softplus else delta


def _gate(y: Tensor, z: Tensor | None) -> Tensor:
    return y if z is None else y * F.silu(z.to(y.dtype))


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference: the recurrence in the wider of fp32 and the input dtype, one step at a time."""
    acc = acc_dtype(u.dtype)
    Bsz, T, Dn = u.shape
    N = A.shape[1]
    delta = _discretise_delta(delta, delta_bias, delta_softplus, acc)
    u, A, B, C = u.to(acc), A.to(acc), B.to(acc), C.to(acc)
    h = state.to(acc) if state is not None else u.new_zeros(Bsz, Dn, N)
    ys = []
    for t in range(T):
        dA = torch.exp(delta[:, t, :, None] * A)  # [B, Dn, N]
        dBu = (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]  # [B, Dn, N]
        h = dA * h + dBu
        ys.append((h * C[:, t, None, :]).sum(-1))  # [B, Dn]
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D.to(acc) * u
    return _gate(y, z), h


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pure PyTorch: a loop over chunks of ``TORCH_CHUNK`` steps, a log-depth scan inside each.

    Never divides by cumulative decays (strong decay underflows towards the true zero); works on
    any device. Slower than the fused kernel on CPU, which ``auto`` prefers there.
    """
    acc = acc_dtype(u.dtype)
    Bsz, T, Dn = u.shape
    N = A.shape[1]
    delta = _discretise_delta(delta, delta_bias, delta_softplus, acc)
    u, A, B, C = u.to(acc), A.to(acc), B.to(acc), C.to(acc)
    h = state.to(acc) if state is not None else u.new_zeros(Bsz, Dn, N)

    def chunk(h: Tensor, delta: Tensor, du: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
        dA = torch.exp(delta[..., None] * A)  # [B, Q, Dn, N]
        dBu = du[..., None] * B[:, :, None, :]  # [B, Q, Dn, N]
        hs, h = linear_rnn_torch(dA, dBu, h)  # hs [B, Q, Dn, N]
        return h, torch.einsum("bqdn,bqn->bqd", hs, C)

    # zero padding (exported programs only) is delta = 0: identity steps
    h, y = scan_time_chunks(chunk, h, (delta, delta * u, B, C), TORCH_CHUNK)
    if D is not None:
        y = y + D.to(acc) * u
    return _gate(y, z), h


# -- fused C++ kernel ------------------------------------------------------------------------------


def _ext():
    return load_extension("selective_scan")


# y = scan + D u, h_T and (when `save`) the per-chunk checkpoints for the backward; At = A^T [N, Dn];
# every tensor contiguous, fp32 or fp64. The backward gives (du, ddelta, dAt, dB, dC, dD, dh0).
_scan_fwd = kernel_op(
    "selective_scan_fwd", extension="selective_scan", kernel="scan_fwd",
    schema="(Tensor u, Tensor delta, Tensor At, Tensor B, Tensor C, Tensor D, Tensor h0, bool save)"
           " -> (Tensor, Tensor, Tensor)",
    fake=lambda u, delta, At, B, C, D, h0, save: (
        torch.empty_like(u), torch.empty_like(h0),
        u.new_empty((u.shape[0], math.ceil(u.shape[1] / FUSED_CHECKPOINT), At.shape[0], u.shape[2])
                    if save else (0,)),
    ),
    backward=Backward(
        kernel="scan_bwd",
        schema="(Tensor dy, Tensor dhT, Tensor u, Tensor delta, Tensor At, Tensor B, Tensor C, Tensor D,"
               " Tensor ckpt) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
        fake=lambda dy, dhT, u, delta, At, B, C, D, ckpt: (
            *(torch.empty_like(t) for t in (u, u, At, B, C, D)), torch.empty_like(dhT)
        ),
        save=lambda inputs, outputs: (*inputs[:6], outputs[2]),
        grads=2,
        checkpoint=2,
    ),
)


def selective_scan_fused(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The fused CPU kernel; the bias, softplus and gate stay in PyTorch around it."""
    acc = acc_dtype(u.dtype)
    Bsz, T, Dn = u.shape
    N = A.shape[1]
    delta = _discretise_delta(delta, delta_bias, delta_softplus, acc)
    Dv = D.to(acc) if D is not None else u.new_zeros(Dn, dtype=acc)
    h0 = state.to(acc) if state is not None else u.new_zeros(Bsz, Dn, N, dtype=acc)
    args = [u.to(acc), delta, A.to(acc).t(), B.to(acc), C.to(acc), Dv, h0]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    y, hT, _ = _scan_fwd(*[t.contiguous() for t in args], save)
    return _gate(y, z), hT


_fused_probe = kernel_probe("selective_scan", "selective scan")

_kernels.register(
    "selective_scan",
    ref=selective_scan_ref,
    torch_impl=selective_scan_torch,
    fused=selective_scan_fused,
    fused_probe=_fused_probe,
)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The selective scan; see the module docstring for the layout. A wrong shape raises
    ``ValueError`` naming the argument."""
    check = ShapeCheck("selective_scan")
    for name, t, dims in (("u", u, "BTD"), ("delta", delta, "BTD"), ("A", A, "DN"), ("B", B, "BTN"),
                          ("C", C, "BTN"), ("D", D, "D"), ("z", z, "BTD"), ("delta_bias", delta_bias, "D"),
                          ("state", state, "BDN")):
        check(name, t, dims)
    impl = _kernels.get("selective_scan", u.device)
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, state)
