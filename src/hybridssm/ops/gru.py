"""The GRU recurrence over a sequence (PyTorch's ``nn.GRU`` equations and gate order r, z, n).

Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder". Per timestep::

    gi = W_ih x_t + b_ih,  gh = W_hh h_{t-1} + b_hh          # [B, 3H], chunks (r, z, n)
    r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n),  h_t = n + z * (h_{t-1} - n)  # the output y_t is h_t

Layout: ``x [B, T, D]``, ``h0 [B, H]``, ``w_ih [3H, D]``, ``w_hh [3H, H]``, ``b_ih, b_hh [3H]``.
Returns ``y [B, T, H]`` (``y[:, -1]`` is the final state) in the wider of fp32 and ``x``'s dtype:
every backend runs the recurrence in that precision.

Backends (``hybridssm.ops._kernels``, op name ``gru``):

* ``ref``: the equations, one timestep at a time, in PyTorch.
* ``torch``: PyTorch's own fused RNN op (what ``nn.GRU`` calls).
* ``fused``: the input projection as one GEMM, then a C++ recurrence (``csrc/gru.cpp``): one
  small GEMM and one vectorised element-wise pass per step, a custom op with autograd whose backward
  walks the sequence once and leaves ``dW_hh``, ``db_hh`` and the input projection's gradients to
  single large GEMMs. PyTorch's CPU RNN op records every step for autograd instead, which makes its
  backward several times slower than its forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._checks import ShapeCheck
from hybridssm.ops._cpu_ext import kernel_probe
from hybridssm.ops._custom_op import Backward, kernel_op
from hybridssm.ops._dtypes import acc_dtype
from hybridssm.ops._time import scan_leading, symbolic_length

__all__ = ["gru", "gru_ref", "gru_torch", "gru_fused", "gru_cell"]


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One step of the equations: ``x [B, D]``, ``h [B, H]`` -> ``h_t [B, H]``."""
    i_r, i_z, i_n = F.linear(x, w_ih, b_ih).chunk(3, dim=-1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)


def gru_ref(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """Reference: :func:`gru_cell` one timestep at a time."""
    acc = acc_dtype(x.dtype)
    weights = [t.to(acc) for t in (w_ih, w_hh, b_ih, b_hh)]
    x, h, ys = x.to(acc), h0.to(acc), []
    for t in range(x.shape[1]):
        h = gru_cell(x[:, t], h, *weights)
        ys.append(h)
    return torch.stack(ys, dim=1)


def gru_torch(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """PyTorch's fused RNN op (the one ``nn.GRU(batch_first=True)`` calls). That op fixes ``T``
    when traced, so an export with a symbolic ``T`` steps :func:`gru_cell` through a ``scan``."""
    acc = acc_dtype(x.dtype)
    params = tuple(t.to(acc) for t in (w_ih, w_hh, b_ih, b_hh))
    if symbolic_length(x.shape[1]):
        def step(h: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
            h = gru_cell(x_t, h, *params)
            return h, h

        return scan_leading(step, h0.to(acc), (x.to(acc),), dim=1)[1]
    y, _ = torch._VF.gru(  # input, hx, params, has_biases, layers, dropout, train, bidirectional, batch_first
        x.to(acc), h0.to(acc).unsqueeze(0).contiguous(), params, True, 1, 0.0, False, False, True
    )
    return y


# -- fused C++ kernel ------------------------------------------------------------------------------


def _gru_grads(saved: tuple, grads: tuple) -> tuple:
    """``(dgi, dh0, dw_hh, db_hh)`` from the kernel's ``(dgi, dgh_n, dh0)``: the recurrent gates'
    gradients are the input ones for r and z, and their own (r * da_n) for n; ``dW_hh`` and ``db_hh``
    are then single large GEMMs over the whole sequence."""
    y, h0, _, _ = saved
    dgi, dghn, dh0 = grads
    H = y.shape[-1]
    dgh = torch.cat([dgi[..., : 2 * H], dghn], dim=-1).reshape(-1, 3 * H)
    h_prev = torch.cat([h0.unsqueeze(1), y[:, :-1]], dim=1).reshape(-1, H)
    return dgi, dh0, dgh.t() @ h_prev, dgh.sum(0)


# (y [B, T, H], gates [B, T, 4H]) from the projected inputs gi [B, T, 3H]; the gates (for the backward)
# only when `save`. Every tensor contiguous, one dtype, fp32 or fp64. The backward kernel gives
# (dgi [B, T, 3H], dgh_n [B, T, H], dh0 [B, H]).
_gru_fwd = kernel_op(
    "gru_fwd", extension="gru", kernel="gru_fwd",
    schema="(Tensor gi, Tensor h0, Tensor w_hh, Tensor b_hh, bool save) -> (Tensor, Tensor)",
    fake=lambda gi, h0, w_hh, b_hh, save: (
        gi.new_empty(*gi.shape[:2], h0.shape[1]),
        gi.new_empty((*gi.shape[:2], 4 * h0.shape[1]) if save else (0,)),
    ),
    backward=Backward(
        kernel="gru_bwd",
        schema="(Tensor dy, Tensor y, Tensor h0, Tensor w_hh, Tensor gates) -> (Tensor, Tensor, Tensor)",
        fake=lambda dy, y, h0, w_hh, gates: (
            y.new_empty(*y.shape[:2], 3 * y.shape[2]), torch.empty_like(y), torch.empty_like(h0)
        ),
        save=lambda inputs, outputs: (outputs[0], inputs[1], inputs[2], outputs[1]),
        grads=1,
        checkpoint=1,
        finish=_gru_grads,
    ),
)


def gru_fused(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """The fused CPU recurrence, in the wider of fp32 and the input dtype."""
    acc = acc_dtype(x.dtype)
    # under autocast the projection runs in bf16 all the same; the recurrence always in ``acc``
    gi = F.linear(x.to(acc), w_ih.to(acc), b_ih.to(acc)).to(acc).contiguous()
    args = [gi, h0.to(acc).contiguous(), w_hh.to(acc).contiguous(), b_hh.to(acc).contiguous()]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in args)
    y, _ = _gru_fwd(*args, save)
    return y


_kernels.register(
    "gru", ref=gru_ref, torch_impl=gru_torch, fused=gru_fused, fused_probe=kernel_probe("gru", "GRU")
)


def gru(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """The GRU recurrence; see the module docstring for the layout. A wrong shape raises
    ``ValueError`` naming the argument."""
    check = ShapeCheck("gru")
    for name, t, dims in (("x", x, "BTD"), ("h0", h0, "BH"), ("w_ih", w_ih, "GD"), ("w_hh", w_hh, "GH"),
                          ("b_ih", b_ih, "G"), ("b_hh", b_hh, "G")):
        check(name, t, dims)
    H, G = check.sizes["H"], check.sizes["G"]
    check.require(G == 3 * H, f"w_ih, w_hh, b_ih and b_hh must have 3H = {3 * H} rows (gates r, z, n), "
                  f"got {G}")
    return _kernels.get("gru", x.device)(x, h0, w_ih, w_hh, b_ih, b_hh)
