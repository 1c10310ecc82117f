"""GRU mixer (the seed's ``:gru`` backbone, ``Axon.gru``): a single-layer gated recurrent unit.

Per timestep (PyTorch's gate order r, z, n; Cho et al. 2014, "Learning Phrase Representations
using RNN Encoder-Decoder")::

    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}          # the output y_t is h_t

The weights are ``nn.GRU``'s (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``: its
``*_l0`` tensors, same shapes, gate order and init). Sequences run through
:func:`hybridssm.ops.gru.gru` (on CPU a fused C++ recurrence; ``use_kernels("torch")`` gives
PyTorch's own RNN op); a single step (``T == 1``) evaluates the same equations with the same weights
(cheaper than any sequence op's setup at batch 1). The state is ``GRUState(h [B, hidden])``.

Holding the parameters directly (not an ``nn.GRU`` submodule) lets ``torch.compile`` trace the mixer
without dynamo's process-wide ``allow_rnn`` flag.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from hybridssm.mixers.base import Mixer, finish_state, state_dtype
from hybridssm.ops.gru import gru, gru_cell
from hybridssm.ops.step import MixerStep

__all__ = ["GRUMixer", "GRUState", "GRUStepWeights"]


class GRUState(NamedTuple):
    h: Tensor  # [B, hidden] hidden state (the wider of fp32 and the parameters' dtype)


class GRUStepWeights(NamedTuple):
    """The parameters the fused step reads (``csrc/step/gru.h``), in its order."""

    weight_ih: Tensor  # [3H, H]
    weight_hh: Tensor  # [3H, H]
    bias_ih: Tensor  # [3H]
    bias_hh: Tensor  # [3H]


class GRUMixer(Mixer):
    """A GRU as a mixer ``[B, T, hidden] -> [B, T, hidden]`` (its output is its hidden state).

    ``lengths``: the state of each row is its output at ``lengths - 1`` (a gather, no packing);
    outputs at padded positions are the GRU run on over the padding (finite, unspecified).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        self.hidden_size = hidden_size
        H = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * H, H))
        self.weight_hh = nn.Parameter(torch.empty(3 * H, H))
        self.bias_ih = nn.Parameter(torch.empty(3 * H))
        self.bias_hh = nn.Parameter(torch.empty(3 * H))
        # nn.GRU's init U(-1/sqrt(H), 1/sqrt(H)), as Axon's GRU uses a uniform init too.
        for p in self.parameters():
            nn.init.uniform_(p, -(H**-0.5), H**-0.5)

    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None) -> GRUState:
        device, dtype = self._device_dtype(device, dtype)
        return GRUState(h=torch.zeros(batch_size, self.hidden_size, device=device, dtype=state_dtype(dtype)))

    def _step(self, x: Tensor, h: Tensor) -> Tensor:
        """One step of the GRU equations with ``nn.GRU``'s weights: ``x [B, d]``, ``h [B, d]``, in
        ``h``'s dtype (the state's: the wider of fp32 and the parameters'), as the sequence op."""
        return gru_cell(x.to(h.dtype), h, *(w.to(h.dtype) for w in self._weights()))

    def _weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def forward(
        self,
        x: Tensor,
        state: GRUState | None = None,
        *,
        lengths: Tensor | None = None,
        inplace: bool = False,
    ) -> tuple[Tensor, GRUState]:
        """``x [B, T, hidden]`` -> ``(y [B, T, hidden], GRUState)``."""
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, device=x.device, dtype=x.dtype)
        if T == 1:  # the streaming step: same equations, same weights, same precision
            y = self._step(x[:, 0], state.h).unsqueeze(1)  # [B, 1, d]
        else:
            y = gru(x, state.h, *self._weights())  # [B, T, d], in the state's precision
        if lengths is None:
            h_last = y[:, -1]
        else:  # the GRU's output is its state: each row's state is its output at lengths - 1
            idx = (lengths - 1).view(B, 1, 1).expand(B, 1, y.shape[-1])
            h_last = y.gather(1, idx).squeeze(1)
        new = GRUState(h=h_last.to(state.h.dtype))
        return y.to(x.dtype), finish_state(state, new, inplace)

    def step_spec(self) -> MixerStep:
        """The fused one-frame step (kind ``gru``), for every configuration."""
        return MixerStep("gru", GRUStepWeights(*self._weights()))
