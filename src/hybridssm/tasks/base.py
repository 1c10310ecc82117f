"""What every synthetic task shares: a frozen options dataclass, seeded generation, seed streams.

A task generates ``(tokens [N, T] long, targets [N, T] long)`` where ``targets`` is ``IGNORE``
(-100, the ``cross_entropy`` ignore index) at every position that is not scored. Generation is a
pure function of ``(options, n, seed)``: it owns its own ``torch.Generator`` and never touches the
global RNGs, so a training run can rebuild any batch from ``(seed, step)`` alone (exact resume).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from hybridssm.checks import unknown_option_error

__all__ = ["IGNORE", "Task", "derive_seed", "SPLITS"]

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index
SPLITS = {"train": 0, "test": 1}


def derive_seed(seed: int, split: str, index: int) -> int:
    """A 63-bit seed for batch ``index`` of ``split``, from the run's ``seed``.

    Train seeds are even and test seeds odd, so the two splits never share a generator seed
    (disjoint by construction, not by luck); the rest comes from numpy's SeedSequence hash.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    mixed = np.random.SeedSequence([int(seed) & (2**63 - 1), SPLITS[split], int(index)])
    high = int(mixed.generate_state(1, dtype=np.uint64)[0]) >> 2  # 62 bits
    return (high << 1) | SPLITS[split]


@dataclass(frozen=True, kw_only=True)
class Task:
    """Base class of the task options; subclasses add their options and :meth:`_generate`.

    Attributes (set by each subclass):
        name: the registry name.
        vocab_size: number of input token ids (the embedding's size).
        num_classes: number of output classes (the head's size).
    """

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    @property
    def vocab_size(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def num_outputs(self) -> int:
        """Width of the model's head: the number of classes (or of regressed values)."""
        return self.num_classes

    @property
    def input_dim(self) -> int | None:
        """Feature size of float-frame inputs; None for token ids (an embedding feeds the model)."""
        return None

    @property
    def regression(self) -> bool:
        """Whether targets are float values (mean squared error) rather than class labels."""
        return False

    @property
    def digest(self) -> str | None:
        """A hash of the data a task reads from a file (None: generated from the options alone)."""
        return None

    @property
    def chance(self) -> float | None:
        """The accuracy of guessing uniformly among the possible answers (None: no such line)."""
        return None

    @classmethod
    def from_options(cls, **opts: Any) -> Task:
        """Build from keyword options; an unknown one raises ``TypeError`` with a suggestion."""
        known = [f.name for f in fields(cls)]
        for key in opts:
            if key not in known:
                raise unknown_option_error(f"task {cls.name!r}", key, known)
        return cls(**opts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def seq_len_for(self, split: str) -> int:
        """The sequence length of ``split`` (parity tests on longer sequences)."""
        return self.seq_len  # type: ignore[attr-defined]

    def generate(self, n: int, seed: int, *, split: str = "train") -> tuple[Tensor, Tensor]:
        """``n`` examples from generator seed ``seed``: ``(tokens [n, T], targets [n, T])``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        gen = torch.Generator().manual_seed(int(seed))
        return self._generate(n, gen, split)

    def batch(self, seed: int, split: str, index: int, n: int) -> tuple[Tensor, Tensor]:
        """Batch ``index`` of ``split`` for the run ``seed`` (see :func:`derive_seed`)."""
        return self.generate(n, derive_seed(seed, split, index), split=split)

    def _generate(self, n: int, gen: torch.Generator, split: str) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover


def check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"task option {name!r} must be an integer >= {low}, got {value!r}")
