"""Training a backbone on a task (synthetic, or your own arrays: ``task="data"``), single process or
data parallel (torch.distributed).

``train(TrainConfig(model="mamba", task="mqar", ...), out="runs/x")`` trains
:class:`~hybridssm.tasks.TaskModel` (embedding or frames -> backbone -> head) with AdamW (no weight decay
on the parameters the library marks: SSM decays, ``D``, norms; nor on biases), linear warm-up then
cosine decay, gradient clipping and optional bf16 autocast.

Reproducibility is the design constraint:

* Batch ``s`` is a pure function of ``(seed, s)`` (:meth:`hybridssm.tasks.Task.batch`), so the data
  order needs no loader state, and every rank draws the same global batch and keeps its slice.
* A checkpoint holds the model, optimizer, scheduler, the torch / CUDA / numpy / Python RNG states,
  the step and the run's config, written atomically (:func:`hybridssm.io.atomic_write`). ``resume``
  from it continues to bitwise the same parameters and metrics as an uninterrupted run.
* A corrupt checkpoint, or one from another run (different model, task or settings), raises
  :class:`CheckpointError` before anything is modified.

Faults end a run cleanly: a non-finite loss or gradient stops it before the update is applied
(:class:`DivergenceError`, naming the step; ``max_nonfinite`` skips a few such steps instead), and
no checkpoint with non-finite weights is ever written; a failed write (a full disk) raises one
:class:`RunFileError` line; on resume, a torn last ``metrics.jsonl`` line is dropped and the
metrics are cut back to the checkpoint's step; temporary files of killed writes are removed.

Data parallel: launch with ``torchrun --nproc_per_node N -m hybridssm train ...`` (gloo on CPU,
NCCL on GPU), or call :func:`train` in processes that already joined a process group. The loss is
normalised by the *global* number of scored targets, so a run on N processes computes the same
loss and gradients as one process with the same global batch (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.io import atomic_write
from hybridssm.registry import build, get_config_class
from hybridssm.tasks import IGNORE, Task, TaskModel, build_task

__all__ = [
    "TrainConfig",
    "TrainResult",
    "CheckpointError",
    "DivergenceError",
    "RunFileError",
    "read_metrics",
    "train",
    "build_task_model",
    "with_embed_dim",
    "evaluate",
    "lr_factor",
    "CHECKPOINT_FILE",
    "METRICS_FILE",
    "RUN_FILE",
    "MODEL_DIR",
]

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"  # the run's settings and the task's chance level (read by `hybridssm plot`)
MODEL_DIR = "model"  # the trained task model, written when the run finishes (``hs.load``)
CHECKPOINT_FORMAT = "hybridssm-train-checkpoint"
CHECKPOINT_VERSION = 1


log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, corrupt, or from a different run."""


class DivergenceError(RuntimeError):
    """The loss became non-finite more often than ``max_nonfinite`` allows; ``step`` is the step
    (1-based) that stopped the run. The last checkpoint on disk holds finite weights."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class RunFileError(OSError):
    """A run file (checkpoint, metrics) could not be written: a full disk, permissions, a path
    that is not a directory. The message names the file and the reason, on one line."""


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
        lr: peak learning rate; ``warmup_steps`` linear warm-up; then cosine to ``min_lr_ratio * lr``.
        weight_decay: AdamW decay on weight matrices (never on marked parameters or biases).
        grad_clip: max global gradient norm (0 disables clipping).
        bf16: run forward/backward under ``torch.autocast(bfloat16)``.
        eval_every: evaluate on the test set every this many steps (and at the end).
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
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    eval_every: int = 100
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
        for name in ("steps", "batch_size", "eval_every", "eval_size", "log_every"):
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


@dataclass
class TrainResult:
    """What :func:`train` returns: the final model (unwrapped), the metric records, the last test
    metrics, the training throughput (of this call's steps) and where files went."""

    model: TaskModel
    history: list[dict[str, Any]]
    final: dict[str, Any]
    train_tokens_per_s: float | None  # None when no step ran (a finished run resumed)
    out: Path | None
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss


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


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _scored(targets: Tensor) -> Tensor:
    """Which targets count: labels other than ``IGNORE``, regression values other than NaN."""
    return targets.isfinite() if targets.is_floating_point() else targets != IGNORE


def _loss_terms(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed loss and number of correct predictions over the scored targets: cross-entropy for
    class labels, squared error (and no "correct") for float targets."""
    if targets.is_floating_point():
        err = torch.where(targets.isfinite(), logits.float() - targets.nan_to_num(), 0.0)
        return err.square().sum(), torch.zeros((), dtype=torch.long, device=logits.device)
    logits = logits.float().flatten(0, 1)
    targets = targets.flatten()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum()
    return loss_sum, correct


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, targets: Tensor, *, batch_size: int, bf16: bool = False
             ) -> dict[str, float]:
    """Mean loss and accuracy (class labels only) over the scored targets of ``(tokens, targets)``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i in range(0, tokens.shape[0], batch_size):
        x, y = tokens[i : i + batch_size].to(device), targets[i : i + batch_size].to(device)
        with _autocast(device, bf16):
            logits = model(x)
        ls, c = _loss_terms(logits, y)
        loss_sum += ls.double()
        correct += c
    model.train(was_training)
    count = int(_scored(targets).sum())
    if targets.is_floating_point():
        return {"test_loss": float(loss_sum) / count}
    return {"test_loss": float(loss_sum) / count, "test_acc": int(correct) / count}


# -- checkpoints ----------------------------------------------------------------------------------
def _rng_states(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # numpy's MT19937 state as plain types + a tensor, so weights_only loading can read it.
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    name, key, *rest = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def save_checkpoint(path: Path, *, step: int, config: TrainConfig, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device,
                    log_sums: Tensor, data_digest: str | None = None) -> None:
    """Write a resumable checkpoint atomically. ``data_digest``: the content hash of the task's
    data file (``task="data"``), so that a resume on a changed file is refused."""
    payload = {
        "data_digest": data_digest,
        "log_sums": log_sums.cpu(),  # partial sums of the next training-metrics record
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "config": config.identity(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_states(device),
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)

    with _writing(path):
        atomic_write(path, write)


class _writing:
    """Turn a failed write of ``path`` into one :class:`RunFileError` line. torch's zip writer
    reports a full disk as a ``RuntimeError`` ("unexpected pos ..."), so both kinds are caught;
    the free space on that disk is named, since a full disk is the usual cause."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, (OSError, RuntimeError)) or isinstance(exc, RunFileError):
            return False
        code = getattr(exc, "errno", None) or 0
        reason = os.strerror(code) if code else (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        try:
            free = f"; {shutil.disk_usage(self.path.parent).free / 2**20:,.0f} MiB free on that disk"
        except OSError:
            free = ""
        raise RunFileError(code or errno.EIO, f"cannot write {self.path}: {reason}{free}") from exc


def load_checkpoint(path: Path, config: TrainConfig, data_digest: str | None = None) -> dict[str, Any]:
    """Read and validate a checkpoint against ``config`` (and the data file's ``data_digest``);
    raises :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/zip error means the file is unusable
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt or not a hybridssm training checkpoint "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a hybridssm training checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt.get('version')}, newer than this hybridssm "
            f"({CHECKPOINT_VERSION}); upgrade hybridssm"
        )
    missing = [k for k in ("step", "config", "model", "optimizer", "scheduler", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
    saved, now = ckpt["config"], config.identity()
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {now.get(k)!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise CheckpointError(
            f"{path} belongs to a different run and cannot be resumed with these settings:\n  "
            + "\n  ".join(diffs)
            + "\n(use the checkpoint's settings, or another output directory to start afresh)"
        )
    saved_digest = ckpt.get("data_digest")
    if saved_digest is not None and data_digest is not None and saved_digest != data_digest:
        raise CheckpointError(
            f"{path} was trained on other data: the file {config.task_options.get('path')} changed "
            f"since (sha256 {saved_digest[:12]}... then, {data_digest[:12]}... now); restore the "
            "file, or use another output directory to start afresh"
        )
    return ckpt


# -- metrics and run files ------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (``[]`` when absent).

    A torn last line (an append cut short by a kill or a full disk) is dropped with a warning;
    an unreadable line elsewhere raises :class:`CheckpointError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (%d bytes; a write was cut short)",
                            path, len(line))
                break
            raise CheckpointError(f"{path} line {i + 1} is not a JSON record ({exc}); "
                                  "remove that line to resume") from exc
    return records


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    with _writing(path):
        atomic_write(path, lambda tmp: tmp.write_bytes(text.encode()))


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with _writing(path), path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")  # one write: a kill leaves at most one torn line


def _remove_orphans(out: Path) -> None:
    """Delete the temporary files of atomic writes that a killed run left behind (each may be as
    large as a checkpoint). Only the names this module writes are touched."""
    from hybridssm.io import CONFIG_FILE, TEMP_SUFFIX, WEIGHTS_FILE

    names = [(out, n) for n in (CHECKPOINT_FILE, METRICS_FILE, RUN_FILE)]
    names += [(out / MODEL_DIR, n) for n in (CONFIG_FILE, WEIGHTS_FILE)]
    found = [p for folder, name in names for p in folder.glob(f".{name}.*{TEMP_SUFFIX}")]
    for p in found:
        p.unlink(missing_ok=True)
    if found:
        log.info("removed %d temporary file(s) left by an interrupted run in %s", len(found), out)


# -- the loop -------------------------------------------------------------------------------------
def _setup_distributed(device_opt: str, timeout_min: float) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        use_cuda = device_opt != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_min))
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _pick_device(opt: str, world: int) -> torch.device:
    if opt == "cpu" or (opt == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("option 'device' is 'cuda' but no CUDA device is available")
    index = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else torch.cuda.current_device()
    return torch.device("cuda", index)


def train(config: TrainConfig, *, out: str | os.PathLike | None = None, resume: bool = False,
          stop_after: int | None = None, quiet: bool = False,
          tensorboard: str | os.PathLike | None = None) -> TrainResult:
    """Train, evaluate and checkpoint; see the module docstring.

    Args:
        out: directory for ``metrics.jsonl`` and ``checkpoint.pt`` (None: keep metrics in memory).
        resume: continue from ``out/checkpoint.pt``; the result equals an uninterrupted run. When
            ``out`` holds no checkpoint yet, the run starts from step 0 (and says so).
        stop_after: stop once this step is reached (checkpointing there), as an interrupted job
            would; a later ``resume`` finishes the run.
        quiet: never show the progress bar.
        tensorboard: also log every metrics record to TensorBoard event files in this directory
            (needs the ``tensorboard`` package: ``pip install hybridssm[tensorboard]``).

    When the run reaches ``config.steps`` with an ``out`` directory, the whole trained task model
    (embedding, backbone, head) is saved in ``out/model`` (``hs.load(out / "model")``; its
    ``.backbone`` is the backbone alone), and ``out/run.json`` holds the run's settings.

    Raises:
        DivergenceError: the loss became non-finite (see ``max_nonfinite``).
        RunFileError: a checkpoint or metrics write failed (e.g. the disk is full).
        CheckpointError: ``resume`` found an unreadable checkpoint or one of another run.
    """
    out = Path(out) if out is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise ValueError(f"output directory 'out' ({out}) is an existing file; give a directory")
    writer_class = _summary_writer_class() if tensorboard is not None else None
    rank, world, own_group = _setup_distributed(config.device, config.ddp_timeout)
    writer = writer_class(str(tensorboard)) if writer_class is not None and rank == 0 else None
    try:
        return _train(config, out, resume, stop_after, quiet, rank, world, writer)
    finally:
        if writer is not None:
            writer.close()
        if own_group:
            dist.destroy_process_group()


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError("TensorBoard logging needs the tensorboard package: "
                          "pip install 'hybridssm[tensorboard]' (or pip install tensorboard)") from exc
    return SummaryWriter


def _run_info(config: TrainConfig, task: Task, n_params: int) -> dict[str, Any]:
    return {"config": config.identity(), "task_name": task.name, "chance": task.chance,
            "regression": task.regression, "backbone_parameters": n_params}


def _kept(ckpt_path: Path | None) -> str:
    if ckpt_path is None:
        return "no output directory, so nothing was kept"
    if ckpt_path.exists():
        return f"the last checkpoint, {ckpt_path}, holds finite weights"
    return "no checkpoint had been written yet"


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _train(config: TrainConfig, out: Path | None, resume: bool, stop_after: int | None, quiet: bool,
           rank: int, world: int, writer: Any) -> TrainResult:
    if config.batch_size % world:
        raise ValueError(
            f"option 'batch_size' ({config.batch_size}) must be divisible by the number of "
            f"processes ({world})"
        )
    device = _pick_device(config.device, world)
    ckpt_path = out / CHECKPOINT_FILE if out is not None else None
    metrics_path = out / METRICS_FILE if out is not None else None
    if resume and out is None:
        raise ValueError("resume needs an output directory (out=) holding a checkpoint")
    if out is not None and out.is_dir() and rank == 0:
        _remove_orphans(out)
    if resume and not ckpt_path.exists():
        if rank == 0:
            log.info("no checkpoint in %s yet: starting the run from step 0", out)
        resume = False

    # Build everything from the seed (every rank alike), then overwrite from the checkpoint.
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    model, task = build_task_model(config)
    model.to(device)
    n_params = sum(p.numel() for p in model.backbone.parameters())
    log.debug("rank %d of %d on %s; run settings: %s", rank, world, device, config.identity())
    if rank == 0:
        log.info("training %s (%s backbone parameters) on %s %s for %d steps%s", config.model,
                 f"{n_params:,}", config.task, dict(config.task_options) or "", config.steps,
                 f", files in {out}" if out is not None else "")
    optimizer = torch.optim.AdamW(
        model.param_groups(config.weight_decay), lr=config.lr, betas=(0.9, 0.95), eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))

    start, history, resumed_sums = 0, [], None
    if resume:
        ckpt = load_checkpoint(ckpt_path, config, task.digest)  # validates before anything is touched
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{ckpt_path} does not fit this model: {exc}") from exc
        _set_rng_states(ckpt["rng"], device)
        resumed_sums = ckpt.get("log_sums")
        start = int(ckpt["step"])
        history = [r for r in read_metrics(metrics_path) if r["step"] <= start]
        if rank == 0:  # drop what an interrupted run logged after its last checkpoint
            _write_metrics(metrics_path, history)
    elif ckpt_path is not None and ckpt_path.exists():
        raise ValueError(
            f"{ckpt_path} already exists: pass resume=True (--resume) to continue that run, "
            "or choose another output directory"
        )
    elif out is not None and rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFileError(exc.errno or errno.EIO, f"cannot create output directory {out}: "
                               f"{exc.strerror or exc}") from exc
        _write_metrics(metrics_path, [])
    if out is not None and rank == 0:
        text = json.dumps(_run_info(config, task, n_params), indent=2)
        with _writing(out / RUN_FILE):
            atomic_write(out / RUN_FILE, lambda tmp: tmp.write_text(text))

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    test_tokens, test_targets = task.batch(config.seed, "test", 0, config.eval_size)
    local = config.batch_size // world
    interactive = config.progress if config.progress is not None else sys.stderr.isatty()
    show = not quiet and rank == 0 and interactive
    # Without a terminal (nohup, a batch system) a bar would write one line per refresh: log
    # a plain progress line every ``progress_every`` steps instead.
    log_progress = not quiet and rank == 0 and not interactive and config.progress_every > 0
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, disable=not show, desc=f"{config.model}/{config.task}",
               dynamic_ncols=True)
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count since log
    if resumed_sums is not None and rank == 0:
        sums.copy_(resumed_sums)
    train_time, train_tokens, skipped = 0.0, 0, 0
    last = min(config.steps, stop_after) if stop_after is not None else config.steps
    ckpt_every = config.checkpoint_every or config.eval_every
    max_norm = config.grad_clip if config.grad_clip > 0 else math.inf  # inf: measure, never clip

    for step in range(start, last):
        t0 = time.perf_counter()
        tokens, targets = task.batch(config.seed, "train", step, config.batch_size)  # the global batch
        count = int(_scored(targets).sum())  # global number of scored targets
        x = tokens[rank * local : (rank + 1) * local].to(device, non_blocking=True)
        y = targets[rank * local : (rank + 1) * local].to(device, non_blocking=True)
        with _autocast(device, config.bf16):
            logits = ddp_model(x)
        loss_sum, correct = _loss_terms(logits, y)
        # DDP averages gradients over ranks: scale so the result is (global sum) / (global count).
        (loss_sum * (world / count)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        done = step + 1
        # Whether to apply this update must be known before the optimizer runs: one scalar read
        # per step. The gradient norm is the same on every rank (DDP reduced it); the local loss
        # is not, so ranks agree through one tiny all-reduce.
        bad = torch.stack([~torch.isfinite(grad_norm), ~torch.isfinite(loss_sum.detach())]).any()
        if world > 1:
            bad = bad.to(torch.int32)
            dist.all_reduce(bad)
        if bool(bad):
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            if skipped > config.max_nonfinite:
                bar.close()
                raise DivergenceError(
                    f"training diverged: non-finite loss or gradient at step {done} "
                    f"({skipped} such step(s), max_nonfinite={config.max_nonfinite}); "
                    f"{_kept(ckpt_path)}; lower the learning rate, or raise max_nonfinite to skip "
                    "such steps",
                    step=done,
                )
            if rank == 0:
                log.warning("step %d: non-finite loss or gradient, update skipped (%d of %d allowed)",
                            done, skipped, config.max_nonfinite)
            scheduler.step()  # the schedule follows the step count, skipped or not
        else:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums += torch.stack([loss_sum.detach().double(), correct.double(),
                                 _scored(y).sum().double()])
        train_time += time.perf_counter() - t0
        train_tokens += tokens.shape[0] * tokens.shape[1]  # positions (tokens or frames)

        record: dict[str, Any] = {}
        if done % config.log_every == 0 or done == config.steps:
            if world > 1:
                dist.all_reduce(sums)
            loss_v, correct_v, count_v = sums.tolist()
            if count_v > 0:  # every step since the last record may have been skipped
                record["loss"] = loss_v / count_v
                if not task.regression:
                    record["acc"] = correct_v / count_v
                record["lr"] = scheduler.get_last_lr()[0]
            sums.zero_()
        if done % config.eval_every == 0 or done == config.steps:
            if rank == 0:
                record.update(evaluate(model, test_tokens, test_targets, batch_size=local, bf16=config.bf16))
        if record and rank == 0:
            record = {"step": done, **record}
            history.append(record)
            if metrics_path is not None:
                _append_metrics(metrics_path, record)
            if writer is not None:
                for key, value in record.items():
                    if key != "step":
                        writer.add_scalar(key, value, done)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "acc", "test_acc")})
        bar.update(1)
        if log_progress and (done % config.progress_every == 0 or done == last):
            latest = {k: v for r in history for k, v in r.items()}
            shown = "".join(f"{k} {latest[k]:.4f} " for k in ("loss", "acc", "test_loss", "test_acc")
                            if k in latest)
            log.info("step %d/%d %s%.0f positions/s", done, config.steps, shown, train_tokens / train_time)
        if ckpt_path is not None and (done % ckpt_every == 0 or done == config.steps or done == last):
            if world > 1:  # rank 0 saves the global partial sums; the other ranks restart theirs
                dist.all_reduce(sums)
                if rank != 0:
                    sums.zero_()
            if rank == 0:
                # An update can make weights non-finite before any loss shows it: never let such
                # weights replace the last good checkpoint.
                if not _all_finite(model.parameters()):
                    bar.close()
                    raise DivergenceError(
                        f"training diverged: non-finite weights after step {done}; "
                        f"{_kept(ckpt_path)}; lower the learning rate",
                        step=done,
                    )
                save_checkpoint(ckpt_path, step=done, config=config, model=model, optimizer=optimizer,
                                scheduler=scheduler, device=device, log_sums=sums, data_digest=task.digest)
    bar.close()
    if out is not None and rank == 0 and last == config.steps:
        with _writing(out / MODEL_DIR):
            model.save_pretrained(out / MODEL_DIR)
    if world > 1:
        dist.barrier()  # rank 0's last checkpoint is on disk before anyone returns
    final = next((r for r in reversed(history) if "test_loss" in r), {})
    tok_s = train_tokens / train_time if train_time > 0 else None
    return TrainResult(model=model, history=history, final=final, train_tokens_per_s=tok_s, out=out,
                       skipped_steps=skipped)
