"""GRU mixer (the seed's ``:gru`` backbone, ``Axon.gru``): a single-layer gated recurrent unit.

Per timestep (PyTorch's gate order r, z, n; Cho et al. 2014, "Learning Phrase Representations
using RNN Encoder-Decoder")::

    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}          # the output y_t is h_t

Sequences run through PyTorch's fused ``nn.GRU``; a single step (``T == 1``) evaluates the same
equations with the same weights (cheaper than the fused op's setup at batch 1, and traceable by
``torch.compile`` without ``allow_rnn``). The state is ``GRUState(h [B, hidden])``.

``torch.compile`` of a multi-step forward needs ``torch._dynamo.config.allow_rnn = True`` (dynamo
otherwise refuses to trace ``nn.GRU``); building a :class:`GRUMixer` sets that process-wide flag.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from hybridssm.mixers.base import Mixer, finish_state, state_dtype

__all__ = ["GRUMixer", "GRUState"]


class GRUState(NamedTuple):
    h: Tensor  # [B, hidden] hidden state (the wider of fp32 and the parameters' dtype)


def _enable_dynamo_rnn() -> None:
    # Without it dynamo graph-breaks (and fullgraph=True fails) on nn.GRU; the flag only lets
    # dynamo trace RNN modules, it changes nothing else.
    try:
        import torch._dynamo

        torch._dynamo.config.allow_rnn = True
    except (ImportError, AttributeError):  # pragma: no cover - builds without dynamo
        pass


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
        # PyTorch's default init U(-1/sqrt(H), 1/sqrt(H)), as Axon's GRU uses a uniform init too.
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        _enable_dynamo_rnn()

    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None) -> GRUState:
        device, dtype = self._device_dtype(device, dtype)
        return GRUState(h=torch.zeros(batch_size, self.hidden_size, device=device, dtype=state_dtype(dtype)))

    def _step(self, x: Tensor, h: Tensor) -> Tensor:
        """One step of the GRU equations with ``nn.GRU``'s weights: ``x [B, d]``, ``h [B, d]``."""
        g = self.gru
        gi = nn.functional.linear(x, g.weight_ih_l0, g.bias_ih_l0)  # [B, 3d]
        gh = nn.functional.linear(h, g.weight_hh_l0, g.bias_hh_l0)  # [B, 3d]
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n)

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
        h0 = state.h.to(x.dtype)
        if T == 1:  # the streaming step: same equations, same weights
            y = self._step(x[:, 0], h0).unsqueeze(1)  # [B, 1, d]
        else:
            y, _ = self.gru(x, h0.unsqueeze(0).contiguous())  # [B, T, d]
        if lengths is None:
            h_last = y[:, -1]
        else:  # the GRU's output is its state: each row's state is its output at lengths - 1
            idx = (lengths - 1).view(B, 1, 1).expand(B, 1, y.shape[-1])
            h_last = y.gather(1, idx).squeeze(1)
        new = GRUState(h=h_last.to(state.h.dtype))
        return y, finish_state(state, new, inplace)
