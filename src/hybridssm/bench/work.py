"""What one call issues, recorded op by op on its PyTorch forms (a ``TorchDispatchMode``): the
transcendental elements it computes (over the ``exp`` rate: the exp part of the ideal time) and the
matrix products it makes, each with its operands' shapes and layouts (timed alone:
:func:`hybridssm.bench.machine.products_rate`, the GEMM rate this call's own shapes reach).

Fused kernels are opaque to a dispatch mode: count under ``use_kernels("torch")``, whose forms
compute the same values (as :func:`~hybridssm.bench.machine.matmul_flops` counts FLOPs).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .machine import counting_flops

__all__ = ["TRANSCENDENTALS", "Product", "Work", "count_work"]

# Exp-equivalents per element each op produces (its in-place and out= forms alike), the cost of one
# ``exp`` each: a vectorised log, tanh, erf, sin or cos costs about one exp (one range reduction and
# one polynomial); sigmoid and silu are one exp (and a division); softplus ``log1p(exp(x))`` and
# log-sigmoid two; softmax and log-softmax one exp per element (the per-row log is left out).
# Not counted: sqrt and rsqrt (an instruction, once per row in a norm), pow, and the exps inside a
# fused attention op (scaled_dot_product_attention; the steps' PyTorch forms call softmax).
TRANSCENDENTALS: Mapping[str, int] = {
    "exp": 1, "exp2": 1, "expm1": 1, "log": 1, "log2": 1, "log10": 1, "log1p": 1,
    "sigmoid": 1, "silu": 1, "tanh": 1, "gelu": 1, "erf": 1, "sin": 1, "cos": 1,
    "softplus": 2, "log_sigmoid_forward": 2, "_softmax": 1, "_log_softmax": 1,
}

# The matrix products: the ops torch's FLOP counter has a formula for, convolutions left out (as in
# matmul_flops: the models' convolutions are depthwise, no GEMM).
_PRODUCTS = frozenset(op for op in flop_registry if "conv" not in str(op))


def _op_name(func: Any) -> str:
    """``aten.exp_`` / ``aten.exp.out`` -> ``"exp"``."""
    name = func.overloadpacket.__name__
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


@dataclass(frozen=True)
class _Operand:
    """A tensor argument's shape, strides and dtype: enough to make one laid out alike."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self, device: torch.device) -> Tensor:
        # as_strided over a buffer that covers the furthest element: keeps transposed and expanded
        # (stride 0) layouts, which decide which GEMM kernel runs
        span = 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride)) if all(self.size) else 0
        return torch.randn(span, device=device).to(self.dtype).as_strided(self.size, self.stride)


def _map(fn: Callable[[Any], Any], value: Any) -> Any:
    """``fn`` on every leaf of nested lists and tuples, which become tuples (hashable)."""
    if isinstance(value, (list, tuple)):
        return tuple(_map(fn, v) for v in value)
    return fn(value)


@dataclass(frozen=True)
class Product:
    """One matrix product a call made: the op and its arguments, tensors as :class:`_Operand`."""

    func: Any
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]

    @classmethod
    def record(cls, func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Product:
        def meta(a: Any) -> Any:
            return _Operand(tuple(a.shape), tuple(a.stride()), a.dtype) if isinstance(a, Tensor) else a

        return cls(func, _map(meta, args), tuple(sorted((k, _map(meta, v)) for k, v in kwargs.items())))

    def _with(self, fn: Callable[[_Operand], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        def leaf(a: Any) -> Any:
            return fn(a) if isinstance(a, _Operand) else a

        return _map(leaf, self.args), {k: _map(leaf, v) for k, v in self.kwargs}

    def tiny(self) -> Product:
        """The same op on 1 x 1 operands: what calling it costs beyond the product itself."""
        args, kwargs = self._with(lambda a: _Operand((1,) * len(a.size), (1,) * len(a.size), a.dtype))
        return Product(self.func, args, tuple(sorted(kwargs.items())))

    def replay(self, device: torch.device | str = "cpu") -> Callable[[], Any]:
        """A call of the same op on fresh operands of the same shapes and layouts (made once: timed
        in a loop, they stay hot in the caches)."""
        device = torch.device(device)
        args, kwargs = self._with(lambda a: a.make(device))
        return lambda: self.func(*args, **kwargs)

    def __str__(self) -> str:
        shapes = [f"{list(a.size)}" for a in self.args if isinstance(a, _Operand)]
        return f"{self.func.overloadpacket.__name__}({', '.join(shapes)})"


@dataclass
class Work:
    """What :func:`count_work` recorded: ``flops`` (of the matrix products, as
    :func:`~hybridssm.bench.machine.matmul_flops` counts them), ``transcendentals`` (exp-equivalent
    elements, weighted by :data:`TRANSCENDENTALS`), ``by_op`` (the same per op name) and ``products``
    (how many times each matrix product was made)."""

    flops: int = 0
    transcendentals: float = 0.0
    by_op: Counter[str] = field(default_factory=Counter)
    products: Counter[Product] = field(default_factory=Counter)


class _Recorder(TorchDispatchMode):
    def __init__(self, work: Work) -> None:
        super().__init__()
        self.work = work

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _PRODUCTS:
            self.work.products[Product.record(func, args, kwargs)] += 1
        elif _op_name(func) not in TRANSCENDENTALS:
            # a composite op (linear, matmul, einsum, softmax) reaches a mode whole under
            # inference_mode: count the ops it is made of, as the FLOP counter does
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        cost = TRANSCENDENTALS.get(_op_name(func))
        if cost:
            produced = out[0] if isinstance(out, (tuple, list)) else out  # log_sigmoid_forward: (out, buffer)
            elements = math.prod(produced.shape) * cost
            self.work.transcendentals += elements
            self.work.by_op[_op_name(func)] += elements
        return out


def count_work(fn: Callable[[], Any]) -> Work:
    """The matmul FLOPs, transcendental elements and matrix products of one call of ``fn`` (see the
    module docstring: count the PyTorch forms), in one pass."""
    work = Work()
    with counting_flops() as flops, _Recorder(work):  # the recorder first: the counter sees what it runs
        fn()
    work.flops = flops()
    return work
