"""The README's custom-backbone example (the README quotes this file; a test checks it)."""

import math
from typing import NamedTuple

import torch
from torch import nn

import hybridssm as hs
from hybridssm.ops.linear_rnn import linear_rnn


class EMAState(NamedTuple):
    h: torch.Tensor  # [B, hidden] fp32; every state tensor starts with the batch


class EMAMixer(nn.Module):
    """A learned per-channel moving average: h_t = a * h_{t-1} + (1 - a) * W x_t."""

    def __init__(self, hidden_size: int, *, init_decay: float = 0.9):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.decay_logit = nn.Parameter(torch.full((hidden_size,), math.log(init_decay / (1 - init_decay))))

    def init_state(self, batch_size, *, device=None, dtype=None, max_len=None):
        w = self.proj.weight
        return EMAState(torch.zeros(batch_size, w.shape[0], device=device or w.device))

    def forward(self, x, state=None, *, lengths=None):
        if state is None:
            state = self.init_state(x.shape[0], device=x.device)
        a = torch.sigmoid(self.decay_logit).expand_as(x)
        b = (1 - a) * self.proj(x)
        if lengths is not None:  # right padding: identity steps leave each row's state untouched
            valid = (torch.arange(x.shape[1], device=x.device) < lengths[:, None]).unsqueeze(-1)
            a, b = torch.where(valid, a, 1.0), torch.where(valid, b, 0.0)
        h, last = linear_rnn(a, b, state.h)  # a parallel scan, accumulated in fp32
        return h.to(x.dtype), EMAState(last)


hs.register_backbone("ema", EMAMixer)
