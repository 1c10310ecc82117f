"""Markdown tables and their cells, one format for every benchmark: numbers with thousands
separators, ratios as ``1.23x``, fractions as percentages, and ``—`` where nothing was measured;
and the command line a report starts with."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["MISSING", "cell", "command_line", "markdown_table", "percent", "ratio", "times"]

MISSING = "—"  # a value that was not measured (the footnotes of each table say why)


def cell(value: Any, spec: str, suffix: str = "") -> str:
    """``value`` formatted by ``spec`` (``format``'s mini-language) and ``suffix``, or ``—``."""
    return MISSING if value is None else format(value, spec) + suffix


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` of two measured values; None when either is missing (or ``b`` is 0)."""
    return a / b if a is not None and b else None


def times(value: float | None) -> str:
    """A ratio: ``1.23x``."""
    return cell(value, ".2f", "x")


def percent(value: float | None) -> str:
    """A fraction as a percentage: whole percents, one decimal below 1%."""
    if value is None:
        return MISSING
    return f"{100 * value:.0f}%" if value >= 0.01 else f"{100 * value:.1f}%"


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: ``head`` then one line per row (each as many cells as ``head``)."""
    for row in rows:
        if len(row) != len(head):
            raise ValueError(f"a table row has {len(row)} cells, the header {len(head)}: {list(row)}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that reproduces a report: ``PYTHONPATH=src python SCRIPT ARGS`` (``argv``: the
    arguments given to the script's ``main``, else the process's)."""
    args = sys.argv[1:] if argv is None else argv
    return f"PYTHONPATH=src python {script}" + "".join(" " + shlex.quote(a) for a in args)
