"""The settings of a training run (:class:`TrainConfig`), their checks, and the model and schedule
they define."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hybridssm.registry import build, get_config_class
from hybridssm.tasks import Task, TaskModel, build_task


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"option {name!r} must be {allowed}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run. Every field except those in :data:`RUN_ONLY` identifies the run: a
    checkpoint resumes only under the same values.

    Attributes:
        model: registered model name; ``model_options`` its options (``embed_dim`` defaults to
            ``hidden_size``: the embedding feeds the backbone without a projection).
        task: task name; ``task_options`` its options.
        steps: optimizer steps; ``batch_size``: the global batch (split over processes).
        lr: peak learning rate; ``warmup_steps`` linear warm-up (None: ``steps // 10``, at most
            100); then cosine to ``min_lr_ratio * lr``.
        weight_decay: AdamW decay on weight matrices (never on marked parameters or biases).
        grad_clip: max global gradient norm (0 disables clipping).
        bf16: run forward/backward under ``torch.autocast(bfloat16)``.
        eval_every: evaluate on the test set every this many steps (and at the end; None:
            ``steps // 10``, at least 1).
        eval_size: number of test examples (a fixed set drawn from the test seed stream).
        seed: model init, dropout and data.
        log_every: training loss/accuracy logged every this many steps (and at the end).
        checkpoint_every: save a checkpoint every this many steps (0: at evaluations only);
            one is always written at the end when the run has an output directory.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        progress: show a tqdm bar (None: only when stderr is a terminal).
        progress_every: without a bar, log one progress line every this many steps (0: never).
        max_nonfinite: training steps with a non-finite loss or gradient that may be skipped (their
            update is not applied); one more stops the run with :class:`DivergenceError`.
        ddp_timeout: minutes a process waits for the others in a collective before the job fails
            (torch's default is 30; a stopped worker should end the job sooner).
    """

    model: str
    model_options: Mapping[str, Any] = field(default_factory=dict)
    task: str = "mqar"
    task_options: Mapping[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    eval_every: int | None = None
    eval_size: int = 512
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    device: str = "auto"
    progress: bool | None = None
    progress_every: int = 100
    max_nonfinite: int = 0
    ddp_timeout: float = 10.0

    def __post_init__(self) -> None:
        _check(_is_int(self.steps) and self.steps >= 1, "steps", self.steps, "a positive integer")
        # The defaults that scale with the run (the same as the command line's).
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", min(100, self.steps // 10))
        if self.eval_every is None:
            object.__setattr__(self, "eval_every", max(1, self.steps // 10))
        for name in ("batch_size", "eval_every", "eval_size", "log_every"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "a positive integer")
        for name in ("warmup_steps", "checkpoint_every", "seed", "progress_every", "max_nonfinite"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 0, name, v, "a non-negative integer")
        _check(_is_num(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            _check(_is_num(v) and v >= 0, name, v, "a non-negative number")
        _check(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
               self.min_lr_ratio, "a number in [0, 1]")
        _check(_is_num(self.ddp_timeout) and self.ddp_timeout > 0, "ddp_timeout", self.ddp_timeout,
               "a positive number of minutes")
        _check(isinstance(self.bf16, bool), "bf16", self.bf16, "True or False")
        _check(self.device in ("auto", "cpu", "cuda"), "device", self.device, "'auto', 'cpu' or 'cuda'")
        _check(self.progress is None or isinstance(self.progress, bool), "progress", self.progress,
               "True, False or None")
        for name in ("model_options", "task_options"):
            v = getattr(self, name)
            _check(isinstance(v, Mapping), name, v, "a mapping of option names to values")

    def identity(self) -> dict[str, Any]:
        """The fields that define the run's result (compared on resume)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUN_ONLY}
        d["model_options"] = dict(self.model_options)
        d["task_options"] = dict(self.task_options)
        return json.loads(json.dumps(d))  # tuples -> lists: the form a checkpoint stores

    def full_model_options(self, input_dim: int | None = None) -> dict[str, Any]:
        """``model_options`` with ``embed_dim`` filled in when absent: the task's ``input_dim``
        (float frames), else ``hidden_size`` (the width of the token embedding)."""
        if input_dim is None:
            return with_embed_dim(self.model, self.model_options)
        given = self.model_options.get("embed_dim", input_dim)
        if given != input_dim:
            raise ValueError(f"option 'embed_dim' must be the data's feature size E = {input_dim} "
                             f"(x is [N, T, E]), got {given!r}; leave it out")
        return {**self.model_options, "embed_dim": input_dim}


def with_embed_dim(model: str | type, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with ``embed_dim`` = ``hidden_size`` (given or default) when absent, so that an
    embedding of that width feeds the backbone without an input projection. An invalid
    ``hidden_size`` is left for the config to report under its own name. ``model``: a registered
    name or its config class."""
    opts = dict(options)
    if "embed_dim" not in opts:
        config_class = get_config_class(model) if isinstance(model, str) else model
        default = {f.name: f.default for f in dataclasses.fields(config_class)}["hidden_size"]
        hidden = opts.get("hidden_size", default)
        opts["embed_dim"] = hidden if _is_int(hidden) and hidden >= 1 else default
    return opts


# Settings that never change the result (max_nonfinite only allows what would otherwise stop the
# run, so a diverged run may be resumed with a higher value).
RUN_ONLY = frozenset({"log_every", "checkpoint_every", "device", "progress", "progress_every",
                      "max_nonfinite", "ddp_timeout"})



def build_task_model(config: TrainConfig) -> tuple[TaskModel, Task]:
    """The task and the model it trains (options validated, nothing trained)."""
    task = build_task(config.task, **config.task_options)
    backbone = build(config.model, **config.full_model_options(task.input_dim))
    return TaskModel(backbone, task.vocab_size, task.num_outputs), task


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``lr`` at ``step``: linear warm-up to 1, then cosine to ``min_lr_ratio``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine

