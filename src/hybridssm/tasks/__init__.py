"""Synthetic tasks: ``TASKS[name]`` is a frozen options dataclass; ``build_task(name, **opts)``.

Each task generates ``(tokens [N, T] long, targets [N, T] long)`` with ``IGNORE`` (-100) where a
position is not scored, from a seed only (:meth:`Task.generate`, :meth:`Task.batch`).
"""

from __future__ import annotations

from typing import Any

from hybridssm.checks import suggest
from hybridssm.tasks.base import IGNORE, Task, derive_seed
from hybridssm.tasks.model import TaskModel
from hybridssm.tasks.mqar import MQAR
from hybridssm.tasks.parity import Parity
from hybridssm.tasks.selective_copy import SelectiveCopy

__all__ = ["TASKS", "IGNORE", "Task", "TaskModel", "build_task", "list_tasks", "derive_seed"]

TASKS: dict[str, type[Task]] = {t.name: t for t in (MQAR, SelectiveCopy, Parity)}


def list_tasks() -> list[str]:
    return sorted(TASKS)


def build_task(name: str, **opts: Any) -> Task:
    """The task ``name`` with ``opts``; unknown names and options get a suggestion."""
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}{suggest(str(name), TASKS)}; available: {', '.join(list_tasks())}"
        )
    return TASKS[name].from_options(**opts)
