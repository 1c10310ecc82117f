"""One Mamba-1 mixer step (T = 1), fused: the streaming fast path.

Layout: ``x [B, d]``, ``in_w [2E, d]``, ``conv_state [B, E, K-1]`` and ``ssm_state [B, E, N]`` (both
updated in place), ``conv_w [E, K]``, ``conv_b [E]`` or None, ``xproj_w [R + 2N, E]``, ``dt_w [E, R]``,
``dt_bias, D [E]``, ``A_log [E, N]``, ``out_w [d, E]``. Returns ``out_proj((C . h + D u) * silu(z))``
``[B, d]``: the same values as the full forward at T = 1 (:mod:`hybridssm.mixers.mamba`).

At batch 1 a step is a few microseconds of arithmetic, so dispatch decides its latency: the eager
chain is ~20 small ops per layer, the fused form one call (the projections as row-blocked gemvs, the
conv, x/dt projections, state update and gate in one loop). Backends: ``ref`` / ``torch`` are the
eager chain; ``fused`` the C++ kernel (no autograd: the mixer takes it only when no gradient is needed).

:func:`mamba_stack_step` goes one level up: a whole stack of pre-norm Mamba blocks (input projection,
per layer norm + mixer + residual, final norm) in one call, which ``SequenceModel.step`` takes for a
``mamba`` model. What is left is reading every weight once per step (~3.8 MB at hidden 256, 2 layers):
the step is bound by memory bandwidth, not by Python. ``-exp(A_log)`` is derived once and kept in a
:class:`DerivedCache` keyed on the parameter's version counter and storage, so it never goes stale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops.scan import _ext, _fused_probe

__all__ = ["mamba_step", "mamba_step_ref", "use_fused_step", "mamba_stack_step", "mamba_stack_step_ref",
           "fused_selected", "neg_exp", "DerivedCache"]


def mamba_step_ref(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor, out_w: Tensor,
) -> Tensor:
    """Reference: the same step as a chain of PyTorch ops (updates the states in place)."""
    return _step_with_A(x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias,
                        -torch.exp(A_log), D, out_w)


def _step_with_A(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor, out_w: Tensor,
) -> Tensor:
    R, N = dt_w.shape[1], A.shape[1]
    xi, z = F.linear(x, in_w).chunk(2, dim=-1)  # [B, E] each
    window = torch.cat([conv_state, xi.unsqueeze(-1)], dim=-1)  # [B, E, K]
    xc = (window * conv_w).sum(-1) + (conv_b if conv_b is not None else 0)
    conv_state.copy_(window[:, :, 1:])
    u = F.silu(xc)
    dt, Bn, Cn = F.linear(u, xproj_w).split([R, N, N], dim=-1)
    delta = F.softplus(F.linear(dt, dt_w) + dt_bias)  # [B, E]
    h = torch.exp(delta.unsqueeze(-1) * A) * ssm_state + (delta * u).unsqueeze(-1) * Bn.unsqueeze(1)
    ssm_state.copy_(h)
    y = (h * Cn.unsqueeze(1)).sum(-1) + D * u
    return F.linear(y * F.silu(z), out_w)


@torch.library.custom_op("hybridssm::mamba_mixer_step", mutates_args=("conv_state", "ssm_state"))
def _mamba_step_op(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor, out_w: Tensor,
) -> Tensor:
    return _ext().mamba_mixer_step(
        x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A, D, out_w
    )


@_mamba_step_op.register_fake
def _mamba_step_fake(x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A, D, out_w):
    return x.new_empty((x.shape[0], out_w.shape[0]), dtype=ssm_state.dtype)


def neg_exp(A_log: Tensor, dtype: torch.dtype) -> Tensor:
    """``A = -exp(A_log)`` in ``dtype``: the same ops as the full forward (``SelectiveSSM``)."""
    return -torch.exp(A_log.to(dtype))


class DerivedCache:
    """One tensor derived from a parameter (``-exp(A_log)`` in a dtype), rebuilt whenever the source
    may have changed, so that it is never stale.

    The key is the source's identity, its version counter (bumped by every in-place op on it:
    optimizer steps, ``load_state_dict``, ``with torch.no_grad(): p.add_(1)``), its data pointer
    (``p.data = ...``, ``.to()``, swapped tensors) and the dtype asked for. The cache holds an alias of
    the source's storage, so no other tensor can take the same address while the entry lives.
    Writes through ``p.data`` (which, by PyTorch's design, bypass the version counter and autograd's
    own checks too) are the one thing it cannot see; call :meth:`clear` after such a write.
    """

    __slots__ = ("_src", "_key", "_alias", "_value")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._src = self._key = self._alias = self._value = None

    def get(self, src: Tensor, dtype: torch.dtype, build) -> Tensor:
        key = (src._version, src.data_ptr(), dtype)
        if src is not self._src or key != self._key:
            with torch.no_grad():
                value = build(src.detach(), dtype)
            self._src, self._key, self._alias, self._value = src, key, src.detach(), value
        return self._value


def mamba_step_fused(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor, out_w: Tensor,
    *, A: Tensor | None = None,
) -> Tensor:
    """The C++ kernel: computes in ``ssm_state``'s dtype; the states must be contiguous. ``A`` (=
    ``-exp(A_log)`` in that dtype) may be passed when the caller keeps it (:class:`DerivedCache`)."""
    if A is None:
        A = neg_exp(A_log, ssm_state.dtype)
    args = (x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A, D, out_w)
    if torch.compiler.is_compiling():
        return _mamba_step_op(*args)
    # Eager: call the kernel directly. The Python custom-op dispatch (autograd and functionalisation
    # wrappers) costs more than the kernel itself at batch 1; compiled graphs go through the op.
    return _ext().mamba_mixer_step(*args)


def _mamba_step_eager(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor, out_w: Tensor,
    *, A: Tensor | None = None,
) -> Tensor:
    return mamba_step_ref(x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A_log, D,
                          out_w)


_kernels.register(
    "mamba_step",
    ref=_mamba_step_eager,
    torch_impl=_mamba_step_eager,
    fused=mamba_step_fused,
    fused_probe=_fused_probe,
)


def use_fused_step(x: Tensor, state_dtype: torch.dtype, params) -> bool:
    """Whether a T = 1 call may take the fused step: the fused backend is selected, no autograd is
    needed, and the states are fp32/fp64 in the parameters' dtype (no autocast)."""
    if _kernels.resolve("mamba_step", x.device.type)[0] != "fused":
        return False
    if state_dtype not in (torch.float32, torch.float64) or x.dtype != state_dtype:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return False
    return True


def mamba_step(
    x: Tensor, in_w: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_w: Tensor, conv_b: Tensor | None,
    xproj_w: Tensor, dt_w: Tensor, dt_bias: Tensor, A_log: Tensor, D: Tensor, out_w: Tensor,
    *, A: Tensor | None = None,
) -> Tensor:
    """One mixer step; see the module docstring (the states are updated in place). ``A`` optionally
    gives ``-exp(A_log)`` already computed in the states' dtype (it must be exactly that)."""
    impl = _kernels.get("mamba_step", x.device)
    return impl(x, in_w, conv_state, ssm_state, conv_w, conv_b, xproj_w, dt_w, dt_bias, A_log, D, out_w, A=A)


def fused_selected(device_type: str = "cpu") -> bool:
    """Whether the fused step kernel is the selected backend on ``device_type`` now."""
    return _kernels.resolve("mamba_step", device_type)[0] == "fused"


def mamba_stack_step(
    x: Tensor, proj_w: Tensor, proj_b: Tensor, weights: list[Tensor], eps: list[float], states: list[Tensor],
    fin_w: Tensor, fin_b: Tensor, fin_eps: float, pos: Tensor,
) -> Tensor:
    """A stack of pre-norm residual Mamba blocks, one frame, in one C++ call (no autograd).

    ``x [B, embed_dim]`` (or ``[B, 1, embed_dim]``) in the states' dtype -> ``h [B, d]``:
    ``h = linear(x, proj_w, proj_b)`` (an empty ``proj_w`` means no projection), then per layer
    ``h = h + mixer_step(layer_norm(h))``, then ``layer_norm(h, fin_w, fin_b, fin_eps)`` (skipped when
    ``fin_w`` is empty); ``pos += 1`` in place unless ``pos`` is empty. ``weights``: 11 per layer
    (norm_w, norm_b, in_w, conv_w, conv_b, xproj_w, dt_w, dt_bias, A = -exp(A_log), D, out_w; an
    empty tensor for an absent bias); ``states``: each layer's ``(conv [B, E, K-1], ssm [B, E, N])``,
    contiguous, in x's dtype, updated in place.
    """
    return _ext().mamba_stack_step(x, proj_w, proj_b, weights, eps, states, fin_w, fin_b, fin_eps, pos)


def mamba_stack_step_ref(
    x: Tensor, proj_w: Tensor, proj_b: Tensor, weights: list[Tensor], eps: list[float], states: list[Tensor],
    fin_w: Tensor, fin_b: Tensor, fin_eps: float, pos: Tensor,
) -> Tensor:
    """:func:`mamba_stack_step` as a chain of PyTorch ops (its eager twin, for tests)."""

    def opt(t: Tensor) -> Tensor | None:
        return t if t.numel() else None

    x = x[:, 0] if x.dim() == 3 else x
    h = F.linear(x, proj_w, opt(proj_b)) if proj_w.numel() else x
    d = h.shape[-1]
    for i, eps_i in enumerate(eps):
        nw, nb, in_w, conv_w, conv_b, xproj_w, dt_w, dt_bias, A, D, out_w = weights[11 * i: 11 * i + 11]
        hn = F.layer_norm(h, (d,), opt(nw), opt(nb), eps_i)
        y = _step_with_A(hn, in_w, states[2 * i], states[2 * i + 1], conv_w, opt(conv_b), xproj_w, dt_w,
                         dt_bias, A, D, out_w)
        h = h + y
    if pos.numel():
        pos.add_(1)
    return F.layer_norm(h, (d,), opt(fin_w), opt(fin_b), fin_eps) if fin_w.numel() else h
