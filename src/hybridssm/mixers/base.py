"""The mixer contract, and small helpers every mixer shares.

A sequence mixer maps ``[B, T, d] -> [B, T, d]`` with one code path for a chunk and a step::

    y, state = mixer(x, state=None, *, lengths=None, inplace=False)
    state = mixer.init_state(batch_size, *, device=None, dtype=None, max_len=None)

* ``state=None`` starts from ``init_state`` (a mixer may skip building a state it is not asked for
  only when it returns ``None``; models always pass a state when they need one back).
* ``lengths [B]`` (int64, 1..T): row ``b`` is valid for ``t < lengths[b]``; the returned state is the
  state after each row's own last valid step. Outputs at padded positions are unspecified.
* ``inplace=True`` writes the new state into the buffers of ``state`` and returns them; otherwise
  ``state`` is never modified.
* States are NamedTuples of tensors whose first dimension is the batch; recurrent states are kept
  in :func:`state_dtype` (the wider of fp32 and the parameters' dtype).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from hybridssm.ops._dtypes import acc_dtype

__all__ = [
    "Mixer",
    "valid_mask",
    "finish_state",
    "state_dtype",
    "check_mixer_state",
]


class Mixer(nn.Module):
    """Base class of the built-in mixers (custom backbones only need the same two methods)."""

    def forward(  # pragma: no cover - abstract
        self, x: Tensor, state: Any = None, *, lengths: Tensor | None = None, inplace: bool = False
    ) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def init_state(  # pragma: no cover - abstract
        self,
        batch_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_len: int | None = None,
    ) -> NamedTuple:
        raise NotImplementedError

    def state_max_len(self, state: NamedTuple) -> int | None:
        """The capacity a state was built with (``max_len``), for mixers whose state has one."""
        return None

    # helpers for subclasses
    def _param(self) -> Tensor:
        return next(self.parameters())

    def _device_dtype(
        self, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> tuple[torch.device, torch.dtype]:
        if device is not None and dtype is not None:  # a model's init_state gives both: no parameter walk
            return torch.device(device), dtype
        p = self._param()
        return torch.device(device) if device is not None else p.device, dtype or p.dtype


# The dtype of recurrent states: the wider of fp32 and the input dtype (the ops' accumulate dtype).
state_dtype = acc_dtype


def valid_mask(lengths: Tensor | None, T: int, device: torch.device) -> Tensor | None:
    """``[B, T]`` bool, True where ``t < lengths[b]`` (None when there is no padding)."""
    if lengths is None:
        return None
    return torch.arange(T, device=device).unsqueeze(0) < lengths.unsqueeze(1)


def finish_state(old: NamedTuple | None, new: NamedTuple, inplace: bool) -> NamedTuple:
    """Return ``new``, or copy it into ``old``'s buffers and return ``old`` when ``inplace``.

    A returned ``new`` is contiguous like the state ``init_state`` allocates: a field that is a view
    of a larger tensor (a conv window sliced from ``[state ; x]``, one of several states split from
    one product) would otherwise change strides after the first frame, and a compiled step would
    recompile on them."""
    if not inplace or old is None:
        return type(new)(*(t.contiguous() if isinstance(t, Tensor) else t for t in new))
    for o, n in zip(old, new):
        if o is not n:
            o.copy_(n)
    return old


def check_mixer_state(mixer: nn.Module, state: Any, batch_size: int, where: str) -> None:
    """Raise ``ValueError`` unless ``state`` has the structure and shapes ``mixer`` produces.

    ``where`` names the state in the message (``"state.layers[2]"``); the message gives the field,
    the expected and the actual type or shape. Dtypes are checked by the model, which knows the
    dtype its states are built in (``SequenceModel._check_state``).
    """
    where = where if where.startswith("state") else f"state {where}"
    state_type, shapes = _state_spec(mixer, state, batch_size)
    if type(state) is not state_type:
        raise ValueError(
            f"{where}: expected a {state_type.__name__} for {type(mixer).__name__}, "
            f"got {type(state).__name__} (a state from another model?)"
        )
    for name, shape, s in zip(state_type._fields, shapes, state):
        if not isinstance(s, Tensor):
            raise ValueError(f"{where}.{name}: expected a tensor, got {type(s).__name__}")
        if tuple(s.shape) != shape:
            raise ValueError(
                f"{where}.{name}: expected shape {shape}, got {tuple(s.shape)} "
                f"(a state from another model or batch size?)"
            )


def _state_spec(mixer: nn.Module, state: Any, batch_size: int) -> tuple[type, tuple]:
    """The state type and field shapes ``mixer`` makes for this batch size (and the capacity
    ``state`` claims), from a meta-device ``init_state``; memoised, since steps check every call."""
    max_len = None
    if hasattr(mixer, "state_max_len") and hasattr(state, "_fields"):
        try:
            max_len = mixer.state_max_len(state)
        except (AttributeError, IndexError, TypeError):
            max_len = None  # a foreign state: the type check below reports it
    cache = mixer.__dict__.setdefault("_hybridssm_state_specs", {})
    key = (batch_size, max_len)
    if key not in cache:
        ref = mixer.init_state(batch_size, device="meta", max_len=max_len)
        cache[key] = (type(ref), tuple(tuple(r.shape) for r in ref))
    return cache[key]
