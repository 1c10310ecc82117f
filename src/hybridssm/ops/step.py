"""The streaming step's fused kernels: one frame (T = 1) of a mixer in one C++ call, no autograd.

Each mixer that has a fused step describes it with :class:`MixerStep` (its kind, its weights in a
NamedTuple defined beside the mixer, integer and float options); ``csrc/step/<kind>.h`` holds the
kernel, registered under the same kind (the C++ contract is in ``csrc/step/common.h``). The weights
are the parameters themselves, never copies or values derived from them, so a step always reads the
current weights (``.data`` writes, ``copy_``, ``load_state_dict``, optimizer steps).

:func:`mixer_step` runs one mixer's kernel: ``x [B, d]`` in the compute dtype, ``states`` the
mixer's state tensors (contiguous; updated in place), ``pos [B]`` int64 each row's input position
before this frame. The reference of every kernel is the mixer's own ``forward`` at T = 1 (the
conformance suite holds the model's step to its forward).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from hybridssm.ops._cpu_ext import load_extension

__all__ = ["MixerStep", "mixer_step", "step_extension", "fused_step_kinds"]

_EMPTY = torch.empty(0)


class MixerStep(NamedTuple):
    """What a mixer's fused step needs: ``kind`` names the C++ kernel; ``weights`` is a NamedTuple of
    parameters (None for an absent one, e.g. no bias); ``ints`` / ``floats`` are its options."""

    kind: str
    weights: Any
    ints: tuple[int, ...] = ()
    floats: tuple[float, ...] = ()

    def flat_weights(self) -> list[Tensor]:
        return [_EMPTY if w is None else w for w in self.weights]


def step_extension():
    """The compiled step kernels (built on first use, cached)."""
    return load_extension("step")


def fused_step_kinds() -> list[str]:
    """The mixer kinds that have a fused step kernel."""
    return list(step_extension().mixer_kinds())


def mixer_step(spec: MixerStep, x: Tensor, states: list[Tensor] | tuple[Tensor, ...], pos: Tensor) -> Tensor:
    """One frame of one mixer through its fused kernel; ``states`` are updated in place."""
    return step_extension().mixer_step(
        spec.kind, x, spec.flat_weights(), list(spec.ints), list(spec.floats), list(states), pos
    )
