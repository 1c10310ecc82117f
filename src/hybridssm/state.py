"""The model state: one NamedTuple per layer plus each row's position. A pytree of tensors."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["ModelState", "map_state", "register_state_types"]


def map_state(fn, state: Any) -> Any:
    """Apply ``fn`` to every tensor of a state (any nesting of NamedTuples and tuples)."""
    return pytree.tree_map(lambda t: fn(t) if isinstance(t, Tensor) else t, state)


class ModelState(NamedTuple):
    """``layers``: one state per block (a parallel block holds a pair); ``pos [B]`` int64: the
    input positions each row has consumed. Every tensor's first dimension is the batch."""

    layers: tuple
    pos: Tensor

    def to(self, *args: Any, **kwargs: Any) -> ModelState:
        """Move every buffer (``state.to("cuda")``); dtype casts apply to float buffers only."""
        def move(t: Tensor) -> Tensor:
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            dev = kwargs.get("device") or next(
                (a for a in args if isinstance(a, (str, torch.device))), t.device
            )
            return t.to(dev)

        return map_state(move, self)

    def clone(self) -> ModelState:
        return map_state(torch.clone, self)

    def detach(self) -> ModelState:
        """Cut the graph (truncated BPTT)."""
        return map_state(torch.Tensor.detach, self)

    def index(self, rows: Tensor | slice | int | list[int]) -> ModelState:
        """The state of some rows of the batch (``rows`` as for tensor indexing on dim 0)."""
        if isinstance(rows, int):
            rows = [rows]
        return map_state(lambda t: t[rows], self)

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]


def _is_namedtuple_type(cls: type) -> bool:
    return issubclass(cls, tuple) and hasattr(cls, "_fields")


def register_state_types(state: Any) -> None:
    """Give every NamedTuple type in ``state`` (per-layer states, custom backbones' too) a
    serialized pytree name, ``module.QualName``, unless it has one.

    ``torch.export`` flattens NamedTuples without this, but writing an exported program's tree
    spec (AOTInductor packages, ``torch.export.save``) needs a name for each type. Called by
    :mod:`hybridssm.export`; call it before exporting your own function of a state."""
    todo = [state]
    while todo:
        node = todo.pop()
        if isinstance(node, Tensor) or not isinstance(node, tuple):
            continue
        cls = type(node)
        if _is_namedtuple_type(cls) and cls not in pytree.SUPPORTED_NODES:
            pytree._register_namedtuple(cls, serialized_type_name=f"{cls.__module__}.{cls.__qualname__}")
        todo.extend(node)


pytree._register_namedtuple(ModelState, serialized_type_name="hybridssm.state.ModelState")
