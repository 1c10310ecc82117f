"""Running parity: the target at step t is the XOR of bits 0..t.

A regular language that a fixed-depth Transformer without positional tricks fails to extrapolate
to longer inputs, while a recurrence can carry one bit of state (Hahn 2020; Delétang et al. 2023,
"Neural Networks and the Chomsky Hierarchy"). Trained on ``seq_len``, tested on ``test_seq_len``
(longer by default), every position scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridssm.tasks.base import Task, check_int

__all__ = ["Parity"]


@dataclass(frozen=True, kw_only=True)
class Parity(Task):
    """Options: ``seq_len`` (training length), ``test_seq_len`` (test length, default 2x)."""

    name = "parity"

    seq_len: int = 32
    test_seq_len: int = 64

    @property
    def vocab_size(self) -> int:
        return 2

    @property
    def chance(self) -> float:
        return 0.5

    def validate(self) -> None:
        check_int("seq_len", self.seq_len, 1)
        check_int("test_seq_len", self.test_seq_len, 1)

    def seq_len_for(self, split: str) -> int:
        return self.test_seq_len if split == "test" else self.seq_len

    def _generate(self, n: int, gen: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        bits = torch.randint(0, 2, (n, self.seq_len_for(split)), generator=gen)
        return bits, bits.cumsum(dim=1) % 2
