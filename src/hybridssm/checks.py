"""The one vocabulary of option checks, below every tier that validates (mixers, layers, configs).

Each check raises ``ValueError`` naming the option, the value and what is allowed (DESIGN §2);
:func:`unknown_option_error` is the ``TypeError`` with a "did you mean" for an unknown name.
:mod:`hybridssm.config` re-exports them for users.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

__all__ = [
    "suggest",
    "unknown_option_error",
    "check_positive",
    "check_optional_positive",
    "check_nonnegative",
    "check_probability",
    "check_positive_float",
    "check_choice",
    "check_bool",
    "largest_divisor_at_most",
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name: str, value: Any) -> None:
    """``value`` must be an int >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"option {name!r} must be a positive integer (>= 1), got {value!r}")


def check_optional_positive(name: str, value: Any) -> None:
    """``value`` must be None (the documented default) or an int >= 1."""
    if value is not None and (not _is_int(value) or value < 1):
        raise ValueError(
            f"option {name!r} must be a positive integer (>= 1) or None, got {value!r}"
        )


def check_nonnegative(name: str, value: Any) -> None:
    """``value`` must be an int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"option {name!r} must be a non-negative integer (>= 0), got {value!r}")


def check_probability(name: str, value: Any) -> None:
    """``value`` must be a number in [0, 1)."""
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"option {name!r} must be a number in [0, 1), got {value!r}")


def check_positive_float(name: str, value: Any) -> None:
    """``value`` must be a finite number > 0."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"option {name!r} must be a finite number > 0, got {value!r}")


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


def largest_divisor_at_most(n: int, limit: int = 64) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (``limit`` itself whenever it divides
    ``n``): the default head width that fits any width (DESIGN §2)."""
    return max(p for p in range(1, min(limit, n) + 1) if n % p == 0)
