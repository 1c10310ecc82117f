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

A whole model's step is one C++ call too (``csrc/step/plan.h``, driven by
:mod:`hybridssm.streaming`): each block describes itself with :class:`BlockStep` (its norm, its
mixers' :class:`MixerStep`, a :class:`FusionStep` for a parallel block, an :class:`FFNStep`), again
holding the parameters themselves.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hybridssm.ops import _kernels
from hybridssm.ops._cpu_ext import kernel_probe, load_extension

__all__ = [
    "MixerStep", "NormStep", "FusionStep", "FFNStep", "BlockStep",
    "mixer_step", "step_extension", "fused_step_kinds", "fused_step_available",
]

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


class NormStep(NamedTuple):
    """A norm in a fused step: ``kind`` is ``"identity"``, ``"layer"`` (LayerNorm, optional bias) or
    ``"rms"`` (RMSNorm, no bias)."""

    kind: str
    weight: Tensor | None = None
    bias: Tensor | None = None
    eps: float = 0.0


class FusionStep(NamedTuple):
    """How a parallel block fuses its two paths ``s`` (first mixer) and ``a`` (second): ``"gate"``
    (``g * s + (1 - g) * a``, ``g = sigmoid(gate_w h + gate_b)``) or ``"mean"`` (``(a + s) / 2``),
    each path first RMS-normalised when its norm is given."""

    kind: str
    gate_w: Tensor | None = None
    gate_b: Tensor | None = None
    ssm_norm: NormStep | None = None
    attn_norm: NormStep | None = None


class FFNStep(NamedTuple):
    """A feed-forward sublayer behind ``norm`` (placed as the block's ``pre_norm`` says), of the
    form ``activation`` (:class:`hybridssm.layers.FFN`): ``"gelu"`` ``down(gelu(up(.)))``,
    ``"swiglu"`` ``down(silu(gate(.)) * up(.))``, ``"geglu"`` ``down(gelu_tanh(gate(.)) * up(.))``."""

    norm: NormStep
    up_w: Tensor
    up_b: Tensor | None
    down_w: Tensor
    down_b: Tensor | None
    activation: str = "gelu"
    gate_w: Tensor | None = None
    gate_b: Tensor | None = None


class BlockStep(NamedTuple):
    """One block of a fused model step: ``norm`` (before the mixers when ``pre_norm``, else after
    the residual add), one mixer (residual block) or two fused by ``fusion`` (parallel block), then
    an optional FFN."""

    pre_norm: bool
    norm: NormStep
    mixers: tuple[MixerStep, ...]
    fusion: FusionStep | None = None
    ffn: FFNStep | None = None


def step_extension():
    """The compiled step kernels (built on first use, cached)."""
    return load_extension("step")


# Listed in hs.kernels() beside the ops: the model's step selects it itself (fused_step_available).
_kernels.register_listed("streaming_step", forms=("ref", "torch", "fused"),
                         fused_probe=kernel_probe("step", "streaming step"))


def fused_step_kinds() -> list[str]:
    """The mixer kinds that have a fused step kernel."""
    return list(step_extension().mixer_kinds())


def fused_backend_selected() -> bool:
    """Whether the kernel backend (``HYBRIDSSM_KERNELS``, :func:`hybridssm.ops.use_kernels`) lets
    the fused step run: ``auto`` or ``fused``. Builds nothing."""
    return _kernels.current_backend() in ("auto", "fused")


def fused_step_available() -> bool:
    """Whether the fused step may run now: :func:`fused_backend_selected` and the extension builds
    (a failed build warns once; the block-by-block step runs instead)."""
    return fused_backend_selected() and _build_ok()


@functools.cache
def _build_ok() -> bool:
    try:
        step_extension()
    except Exception as exc:  # a build failure must never break the model
        warnings.warn(f"hybridssm: the fused step did not build ({exc}); using the block-by-block step",
                      stacklevel=3)
        return False
    return True


def mixer_step(spec: MixerStep, x: Tensor, states: list[Tensor] | tuple[Tensor, ...], pos: Tensor) -> Tensor:
    """One frame of one mixer through its fused kernel; ``states`` are updated in place."""
    return step_extension().mixer_step(
        spec.kind, x, spec.flat_weights(), list(spec.ints), list(spec.floats), list(states), pos
    )
