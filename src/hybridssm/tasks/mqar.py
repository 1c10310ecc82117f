"""Multi-query associative recall (MQAR), as defined by Zoology (Arora et al. 2023).

Reference: "Zoology: Measuring and Improving Recall in Efficient Language Models", arXiv:2312.04927.

Layout of one example (``N = num_kv_pairs``, ``V = vocab_size``, ``T = seq_len``)::

    k_1 v_1 k_2 v_2 ... k_N v_N | q . q . . . q ...          (T tokens)
    keys   from 1 .. V/2 - 1     (distinct within an example)
    values from V/2 .. V - 1     (distinct within an example)

After the ``2N`` context tokens, each key is asked once, in a random order, at an even offset
``2g`` of the query region (``g`` in ``0 .. (T - 2N) / 2 - 1``). The gaps ``g`` are drawn without
replacement with probability ``p(g) ~ (g + 1) ** (alpha - 1)`` with ``alpha = power_a = 0.01``:
a power law, so most queries come soon after the context, as repeated bigrams do in text. Only a
query position is scored; its target is the value paired with the key (next-token prediction).
Every other query-region position holds a uniformly random token of the whole vocabulary
(Zoology's ``random_non_queries``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hybridssm.tasks.base import IGNORE, Task, check_int

__all__ = ["MQAR"]


@dataclass(frozen=True, kw_only=True)
class MQAR(Task):
    """Options: ``vocab_size`` (even, >= 4), ``seq_len`` (even), ``num_kv_pairs`` (4 * N <= T, and
    N distinct keys and values must exist: N <= V/2 - 1), ``power_a`` in (0, 1]."""

    name = "mqar"

    vocab_size: int = 64  # type: ignore[assignment]
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01

    def validate(self) -> None:
        check_int("vocab_size", self.vocab_size, 4)
        check_int("seq_len", self.seq_len, 4)
        check_int("num_kv_pairs", self.num_kv_pairs, 1)
        if self.vocab_size % 2:
            raise ValueError(f"task option 'vocab_size' must be even (keys | values), got {self.vocab_size}")
        if self.seq_len % 2:
            raise ValueError(f"task option 'seq_len' must be even, got {self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(
                f"task option 'num_kv_pairs' must be <= seq_len / 4 = {self.seq_len // 4} "
                f"(context and queries must fit), got {self.num_kv_pairs}"
            )
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(
                f"task option 'num_kv_pairs' must be <= vocab_size / 2 - 1 = {self.vocab_size // 2 - 1} "
                f"(distinct keys), got {self.num_kv_pairs}"
            )
        if isinstance(self.power_a, bool) or not isinstance(self.power_a, (int, float)) or not (
            0 < self.power_a <= 1
        ):
            raise ValueError(f"task option 'power_a' must be a number in (0, 1], got {self.power_a!r}")

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab_size - self.vocab_size // 2)  # one of the V/2 values

    def gap_probabilities(self) -> Tensor:
        """``p(g)`` for the query gaps ``g = 0 .. space - 1`` (normalised power law)."""
        space = (self.seq_len - 2 * self.num_kv_pairs) // 2
        g = torch.arange(1, space + 1, dtype=torch.float64)
        p = self.power_a * g ** (self.power_a - 1)
        return p / p.sum()

    def _generate(self, n: int, gen: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        V, T, N = self.vocab_size, self.seq_len, self.num_kv_pairs
        half, ctx = V // 2, 2 * N
        # Distinct keys / values per row: the first N of a random permutation.
        keys = torch.rand(n, half - 1, generator=gen).argsort(dim=1)[:, :N] + 1  # [n, N] in 1..V/2-1
        values = torch.rand(n, V - half, generator=gen).argsort(dim=1)[:, :N] + half  # [n, N]

        tokens = torch.randint(0, V, (n, T), generator=gen)  # random filler everywhere
        tokens[:, 0:ctx:2] = keys
        tokens[:, 1:ctx:2] = values
        p = self.gap_probabilities().to(torch.float32).expand(n, -1)
        gaps = torch.multinomial(p, N, replacement=False, generator=gen)  # [n, N], distinct per row
        pos = ctx + 2 * gaps  # query positions; key i is asked at pos[:, i]
        tokens.scatter_(1, pos, keys)
        targets = torch.full((n, T), IGNORE, dtype=torch.long)
        targets.scatter_(1, pos, values)
        return tokens, targets
