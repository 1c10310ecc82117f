"""Tasks: ``TASKS`` is the task registry (name -> options dataclass); ``build_task(name, **opts)``;
``register_task(name, TaskClass)`` adds your own. The synthetic tasks, and ``data`` (your own
arrays from a file, :mod:`hybridssm.tasks.data`).

Each task generates ``(tokens [N, T] long, targets [N, T] long)`` with ``IGNORE`` (-100) where a
position is not scored, from a seed only (:meth:`Task.generate`, :meth:`Task.batch`).
"""

from __future__ import annotations

from typing import Any

from hybridssm.registry import Registry
from hybridssm.tasks.base import IGNORE, Task, derive_seed
from hybridssm.tasks.data import ArrayData
from hybridssm.tasks.model import TaskModel
from hybridssm.tasks.mqar import MQAR
from hybridssm.tasks.parity import Parity
from hybridssm.tasks.selective_copy import SelectiveCopy

__all__ = [
    "TASKS",
    "IGNORE",
    "Task",
    "TaskModel",
    "build_task",
    "list_tasks",
    "register_task",
    "derive_seed",
]

TASKS: Registry[type[Task]] = Registry("task", hint="register your own with hybridssm.register_task")


def register_task(name: str, factory: type[Task], *, replace: bool = False) -> type[Task]:
    """Make the task ``factory`` available by ``name`` (``build_task``, ``train(task=name)``, the
    CLI's ``train --task NAME``, once the module that registers it is imported: ``--import``).

    ``factory`` is a :class:`Task` subclass declared with ``@dataclass(frozen=True, kw_only=True)``:
    its fields are the task's options (the CLI parses ``--task-opt`` by their types), and it
    implements ``vocab_size`` and ``_generate(n, generator, split)``. A name already registered to
    another class raises ``ValueError`` unless ``replace=True`` (a new definition of the same class,
    from code run again, replaces it). Returns ``factory``.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"task name must be an identifier string, got {name!r}")
    if not (isinstance(factory, type) and issubclass(factory, Task)):
        raise TypeError(
            f"register_task({name!r}, ...) takes a hybridssm.tasks.Task subclass, got {factory!r}"
        )
    if "__dataclass_fields__" not in vars(factory):
        raise TypeError(
            f"register_task({name!r}, {factory.__name__}): declare the class with "
            "@dataclass(frozen=True, kw_only=True) so that its fields are the task's options"
        )
    TASKS.register(name, factory, replace=replace)
    if not factory.name:
        factory.name = name  # error messages of its options name the task
    return factory


for _task in (MQAR, SelectiveCopy, Parity, ArrayData):
    register_task(_task.name, _task)


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return TASKS.names()


def build_task(name: str, **opts: Any) -> Task:
    """The task ``name`` with ``opts``; unknown names and options get a suggestion."""
    return TASKS.get(name).from_options(**opts)
