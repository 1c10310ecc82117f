"""One call registers a fused C++ kernel as a ``torch.library`` custom op: its forward, its fake (the
shapes, for ``torch.compile`` and meta tensors) and, when it has one, its backward kernel and the
autograd formula that calls it. Registration is cheap and loads nothing: the extension is built or
loaded (:mod:`hybridssm.ops._cpu_ext`) at the op's first real call.

Every fused kernel with a backward follows one pattern, which :class:`Backward` describes: the
forward saves some of its inputs and outputs; the backward kernel takes the gradients of the first
``grads`` outputs (zeros for those that got none) followed by the saved tensors; ``finish`` (if any)
turns the kernel's results into the gradients of the forward's leading inputs (reductions the
kernel leaves to PyTorch), and every later input (flags, sizes) gets ``None``. A forward that
skips its checkpoints when no gradient is needed (a ``save`` flag) names the ``checkpoint`` output,
so that differentiating it anyway fails clearly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from hybridssm.ops._cpu_ext import load_extension

__all__ = ["Backward", "kernel_op"]

NAMESPACE = "hybridssm"


class Backward(NamedTuple):
    """The backward of a :func:`kernel_op`: ``kernel`` (the C++ function) with ``schema`` and
    ``fake``, registered as the op ``<name>_bwd``."""

    kernel: str
    schema: str
    fake: Callable
    # (forward inputs, forward outputs) -> the tensors the backward kernel takes after the gradients
    save: Callable[[tuple, tuple], tuple[Tensor, ...]]
    grads: int = 1  # the first `grads` outputs are differentiable
    checkpoint: int | None = None  # the output that is empty when the forward ran with save=False
    # (saved tensors, backward kernel's results) -> gradients of the forward's leading inputs
    finish: Callable[[tuple, tuple], tuple] | None = None


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def kernel_op(
    name: str, *, extension: str, kernel: str, schema: str, fake: Callable, backward: Backward | None = None,
    mutates_args: tuple[str, ...] = (),
) -> Callable:
    """Register ``hybridssm::<name>`` (``schema``, e.g. ``"(Tensor x, bool save) -> (Tensor, Tensor)"``)
    running ``kernel`` of ``csrc/<extension>.cpp``, with ``fake`` for tracing and, if given, its
    ``backward``; ``mutates_args`` names the arguments the kernel writes in place (they are marked
    ``Tensor(a!)`` in ``schema``, e.g. a streaming step's states). Returns the op (call it like a
    function)."""

    def impl(*args):
        out = getattr(load_extension(extension), kernel)(*args)
        return tuple(out) if isinstance(out, list) else out

    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=mutates_args, schema=schema)
    op.register_fake(fake)
    if backward is not None:
        bwd = kernel_op(f"{name}_bwd", extension=extension, kernel=backward.kernel, schema=backward.schema,
                        fake=backward.fake)
        setup_context, grad_fn = _autograd(name, bwd, backward)
        op.register_autograd(grad_fn, setup_context=setup_context)
    return op


def _autograd(name: str, bwd: Callable, spec: Backward) -> tuple[Callable, Callable]:
    def setup_context(ctx, inputs, output) -> None:
        outs = _as_tuple(output)
        ctx.save_for_backward(*spec.save(inputs, outs))
        ctx.grad_like = [(o.shape, o.dtype, o.device) for o in outs[: spec.grads]]
        ctx.differentiable = spec.checkpoint is None or outs[spec.checkpoint].numel() > 0
        ctx.num_inputs = len(inputs)

    def backward(ctx, *grads):
        if not ctx.differentiable:
            raise RuntimeError(f"{name} ran with save=False; it cannot be differentiated")
        saved = ctx.saved_tensors
        grads = [
            torch.zeros(shape, dtype=dtype, device=device) if g is None else g.contiguous()
            for g, (shape, dtype, device) in zip(grads, ctx.grad_like)
        ]
        out = _as_tuple(bwd(*grads, *saved))
        if spec.finish is not None:
            out = spec.finish(saved, out)
        return (*out, *[None] * (ctx.num_inputs - len(out)))

    return setup_context, backward
