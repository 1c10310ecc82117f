"""Base configuration: frozen dataclasses with validation, suggestions and JSON round trips.

Every model has one config class (``MambaConfig``, ``HymbaConfig``, ...) derived from
:class:`ModelConfig`. ``build(name, **opts) == Model(Config(**opts))``. Validation runs in
``__post_init__``, so a bad value fails before any weight is allocated.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

__all__ = [
    "ModelConfig",
    "SSMConfig",
    "check_positive",
    "check_nonnegative",
    "check_probability",
    "check_choice",
    "check_bool",
    "unknown_option_error",
]


def suggest(name: str, choices: Iterable[str]) -> str:
    """A " (did you mean 'x'?)" suffix when ``name`` is close to one of ``choices``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_option_error(what: str, name: str, choices: Iterable[str]) -> TypeError:
    choices = sorted(choices)
    return TypeError(
        f"{what} got an unknown option {name!r}{suggest(name, choices)}; "
        f"valid options are: {', '.join(choices)}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive(name: str, value: Any) -> None:
    """``value`` must be an int >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"option {name!r} must be a positive integer (>= 1), got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """``value`` must be an int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"option {name!r} must be a non-negative integer (>= 0), got {value!r}")


def check_probability(name: str, value: Any) -> None:
    """``value`` must be a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"option {name!r} must be a number in [0, 1), got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """``value`` must be one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        hint = suggest(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ValueError(
            f"option {name!r} must be one of {', '.join(map(repr, choices))}; got {value!r}{hint}"
        )


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"option {name!r} must be True or False, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Options shared by every model (names and defaults follow the seeds).

    Attributes:
        embed_dim: size of each input frame (required).
        hidden_size: width of the residual stream, and the output size.
        num_layers: number of blocks.
        dropout: dropout rate between blocks (0 disables it).
        window_size: the seeds' "expected sequence length"; where a model's attention slides it is
            the attention window (W keys, the current one included). Never a length limit elsewhere.
        seq_len: the seeds' fixed length for JIT; stored only (defaults to ``window_size``).
        checkpoint_every: gradient checkpointing, one segment of this many blocks (0 = off).
    """

    model_name: ClassVar[str] = ""
    recommended: ClassVar[dict] = {}

    embed_dim: int
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.0
    window_size: int = 60
    seq_len: int | None = None
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option, the value and what is allowed."""
        for name in ("embed_dim", "hidden_size", "num_layers", "window_size"):
            check_positive(name, getattr(self, name))
        if self.seq_len is not None:
            check_positive("seq_len", self.seq_len)
        check_nonnegative("checkpoint_every", self.checkpoint_every)
        check_probability("dropout", self.dropout)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_options(cls, **opts: Any) -> ModelConfig:
        """Build from keyword options; an unknown one raises ``TypeError`` with a suggestion."""
        known = set(cls.option_names())
        for name in opts:
            if name not in known:
                raise unknown_option_error(f"{cls.model_name or cls.__name__}", name, known)
        missing = [
            f.name
            for f in fields(cls)
            if f.name not in opts
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise TypeError(
                f"{cls.model_name or cls.__name__} needs option(s) {', '.join(map(repr, missing))}"
            )
        return cls(**opts)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (validated, unknown names rejected)."""
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return type(self).from_options(**{**current, **changes})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _to_jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        return cls.from_options(**{k: _from_jsonable(v) for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps({"model": self.model_name, "config": self.to_dict()}, indent=2)

    @property
    def expected_seq_len(self) -> int:
        """The seeds' expected sequence length (``seq_len``, else ``window_size``)."""
        return self.seq_len or self.window_size


@dataclass(frozen=True, kw_only=True)
class SSMConfig(ModelConfig):
    """The seed's Mamba options, shared by the pure SSM stacks (``gated_ssm``, ``mamba``,
    ``mamba2``), with the seed's defaults and recommended values.

    Attributes:
        state_size: N, the SSM state size.
        expand_factor: inner width ``E = expand_factor * hidden_size``.
        conv_size: K, the width of the causal conv.
    """

    recommended: ClassVar[dict] = dict(
        hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2,
        window_size=60, dropout=0.1,
    )

    state_size: int = 16
    expand_factor: int = 2
    conv_size: int = 4
    num_layers: int = 2

    def validate(self) -> None:
        super().validate()
        for name in ("state_size", "expand_factor", "conv_size"):
            check_positive(name, getattr(self, name))


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _to_jsonable(v) for k, v in value.items()}
    return value


def _from_jsonable(value: Any) -> Any:
    # Configs hold tuples (frozen); JSON gives lists back.
    if isinstance(value, list):
        return tuple(_from_jsonable(v) for v in value)
    return value
