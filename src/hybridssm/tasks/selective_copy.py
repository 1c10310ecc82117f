"""Selective copying (Gu & Dao 2023, "Mamba", §3.1; after Arjovsky et al. 2016's copying task).

Layout (``K = num_tokens``, region ``R = seq_len - 1 - K``)::

    . . a . . b . c . . d . .  | #  | _ _ _ _
    data tokens scattered in R   marker  K output slots

``.`` is the blank token 0, ``#`` the marker 1, data tokens are drawn from ``2 .. vocab_size - 1``
and placed at sorted random positions of the region. The output slots hold blanks as inputs; slot
``j`` is scored with target = the ``j``-th data token in order. Nothing else is scored. The model
must remember *which* inputs were data (content-dependent selection), not fixed positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridssm.tasks.base import IGNORE, Task, check_int

__all__ = ["SelectiveCopy", "BLANK", "MARKER"]

BLANK, MARKER = 0, 1


@dataclass(frozen=True, kw_only=True)
class SelectiveCopy(Task):
    """Options: ``vocab_size`` (>= 3: blank, marker, data), ``seq_len``, ``num_tokens`` (K, with
    ``K <= seq_len - 1 - K``)."""

    name = "selective_copy"

    vocab_size: int = 16  # type: ignore[assignment]
    seq_len: int = 64
    num_tokens: int = 8

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab_size - 2)  # one of the data tokens

    def validate(self) -> None:
        check_int("vocab_size", self.vocab_size, 3)
        check_int("seq_len", self.seq_len, 3)
        check_int("num_tokens", self.num_tokens, 1)
        region = self.seq_len - 1 - self.num_tokens
        if self.num_tokens > region:
            raise ValueError(
                f"task option 'num_tokens' must be <= (seq_len - 1) / 2 = {(self.seq_len - 1) // 2} "
                f"(the tokens must fit in the region before the marker), got {self.num_tokens}"
            )

    def _generate(self, n: int, gen: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        T, K = self.seq_len, self.num_tokens
        R = T - 1 - K
        data = torch.randint(2, self.vocab_size, (n, K), generator=gen)  # [n, K]
        # K distinct sorted positions in the region: the K smallest of a random permutation.
        where = torch.rand(n, R, generator=gen).argsort(dim=1)[:, :K].sort(dim=1).values
        tokens = torch.full((n, T), BLANK, dtype=torch.long)
        tokens.scatter_(1, where, data)
        tokens[:, R] = MARKER
        targets = torch.full((n, T), IGNORE, dtype=torch.long)
        targets[:, R + 1 :] = data
        return tokens, targets
