"""Training a backbone on a synthetic task, single process or data parallel (torch.distributed).

``train(TrainConfig(model="mamba", task="mqar", ...), out="runs/x")`` trains
:class:`~hybridssm.tasks.TaskModel` (embedding -> backbone -> head) with AdamW (no weight decay
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

Data parallel: launch with ``torchrun --nproc_per_node N -m hybridssm train ...`` (gloo on CPU,
NCCL on GPU), or call :func:`train` in processes that already joined a process group. The loss is
normalised by the *global* number of scored targets, so a run on N processes computes the same
loss and gradients as one process with the same global batch (up to float summation order).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
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
    "train",
    "build_task_model",
    "with_embed_dim",
    "evaluate",
    "lr_factor",
    "CHECKPOINT_FILE",
    "METRICS_FILE",
]

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FORMAT = "hybridssm-train-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, corrupt, or from a different run."""


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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_size", "log_every"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "a positive integer")
        for name in ("warmup_steps", "checkpoint_every", "seed"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 0, name, v, "a non-negative integer")
        _check(_is_num(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            _check(_is_num(v) and v >= 0, name, v, "a non-negative number")
        _check(_is_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
               self.min_lr_ratio, "a number in [0, 1]")
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

    def full_model_options(self) -> dict[str, Any]:
        """``model_options`` with ``embed_dim`` filled in (= ``hidden_size``) when absent."""
        return with_embed_dim(self.model, self.model_options)


def with_embed_dim(model: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with ``embed_dim`` = ``hidden_size`` (given or default) when absent, so that an
    embedding of that width feeds the backbone without an input projection. An invalid
    ``hidden_size`` is left for the config to report under its own name."""
    opts = dict(options)
    if "embed_dim" not in opts:
        default = {f.name: f.default for f in dataclasses.fields(get_config_class(model))}["hidden_size"]
        hidden = opts.get("hidden_size", default)
        opts["embed_dim"] = hidden if _is_int(hidden) and hidden >= 1 else default
    return opts


RUN_ONLY = frozenset({"log_every", "checkpoint_every", "device", "progress"})


@dataclass
class TrainResult:
    """What :func:`train` returns: the final model (unwrapped), the metric records, the last test
    metrics, the training throughput and where files went."""

    model: TaskModel
    history: list[dict[str, Any]]
    final: dict[str, Any]
    train_tokens_per_s: float
    out: Path | None


def build_task_model(config: TrainConfig) -> tuple[TaskModel, Task]:
    """The task and the model it trains (options validated, nothing trained)."""
    task = build_task(config.task, **config.task_options)
    backbone = build(config.model, **config.full_model_options())
    return TaskModel(backbone, task.vocab_size, task.num_classes), task


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


def _loss_terms(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and number of correct predictions over the scored positions."""
    logits = logits.float().flatten(0, 1)
    targets = targets.flatten()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    correct = ((logits.argmax(-1) == targets) & (targets != IGNORE)).sum()
    return loss_sum, correct


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, targets: Tensor, *, batch_size: int, bf16: bool = False
             ) -> dict[str, float]:
    """Mean loss and accuracy over the scored positions of ``(tokens, targets)``."""
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
    count = int((targets != IGNORE).sum())
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
                    log_sums: Tensor) -> None:
    payload = {
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

    atomic_write(path, write)


def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    """Read and validate a checkpoint against ``config``; raises :class:`CheckpointError`."""
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
    return ckpt


# -- metrics --------------------------------------------------------------------------------------
def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: tmp.write_bytes(text.encode()))


# -- the loop -------------------------------------------------------------------------------------
def _setup_distributed(device_opt: str) -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        use_cuda = device_opt != "cpu" and torch.cuda.is_available()
        dist.init_process_group("nccl" if use_cuda else "gloo")
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
          stop_after: int | None = None, quiet: bool = False) -> TrainResult:
    """Train, evaluate and checkpoint; see the module docstring.

    Args:
        out: directory for ``metrics.jsonl`` and ``checkpoint.pt`` (None: keep metrics in memory).
        resume: continue from ``out/checkpoint.pt``; the result equals an uninterrupted run.
        stop_after: stop once this step is reached (checkpointing there), as an interrupted job
            would; a later ``resume`` finishes the run.
        quiet: never show the progress bar.
    """
    rank, world, own_group = _setup_distributed(config.device)
    try:
        return _train(config, out, resume, stop_after, quiet, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, out, resume: bool, stop_after: int | None, quiet: bool,
           rank: int, world: int) -> TrainResult:
    if config.batch_size % world:
        raise ValueError(
            f"option 'batch_size' ({config.batch_size}) must be divisible by the number of "
            f"processes ({world})"
        )
    device = _pick_device(config.device, world)
    out = Path(out) if out is not None else None
    ckpt_path = out / CHECKPOINT_FILE if out is not None else None
    metrics_path = out / METRICS_FILE if out is not None else None
    if resume and out is None:
        raise ValueError("resume needs an output directory (out=) holding a checkpoint")

    # Build everything from the seed (every rank alike), then overwrite from the checkpoint.
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    random.seed(config.seed)
    model, task = build_task_model(config)
    model.to(device)
    optimizer = torch.optim.AdamW(
        model.param_groups(config.weight_decay), lr=config.lr, betas=(0.9, 0.95), eps=1e-8
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))

    start, history, resumed_sums = 0, [], None
    if resume:
        ckpt = load_checkpoint(ckpt_path, config)  # validates before anything is touched
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{ckpt_path} does not fit this model: {exc}") from exc
        _set_rng_states(ckpt["rng"], device)
        resumed_sums = ckpt.get("log_sums")
        start = int(ckpt["step"])
        history = [r for r in _read_metrics(metrics_path) if r["step"] <= start]
        if rank == 0:  # drop what an interrupted run logged after its last checkpoint
            _write_metrics(metrics_path, history)
    elif ckpt_path is not None and ckpt_path.exists():
        raise ValueError(
            f"{ckpt_path} already exists: pass resume=True (--resume) to continue that run, "
            "or choose another output directory"
        )
    elif out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_metrics(metrics_path, [])

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    test_tokens, test_targets = task.batch(config.seed, "test", 0, config.eval_size)
    local = config.batch_size // world
    show = (not quiet and rank == 0 and
            (config.progress if config.progress is not None else sys.stderr.isatty()))
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, disable=not show, desc=f"{config.model}/{config.task}",
               dynamic_ncols=True)
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count since log
    if resumed_sums is not None and rank == 0:
        sums.copy_(resumed_sums)
    train_time, train_tokens = 0.0, 0
    last = min(config.steps, stop_after) if stop_after is not None else config.steps
    ckpt_every = config.checkpoint_every or config.eval_every

    for step in range(start, last):
        t0 = time.perf_counter()
        tokens, targets = task.batch(config.seed, "train", step, config.batch_size)  # the global batch
        count = int((targets != IGNORE).sum())  # global number of scored targets
        x = tokens[rank * local : (rank + 1) * local].to(device, non_blocking=True)
        y = targets[rank * local : (rank + 1) * local].to(device, non_blocking=True)
        with _autocast(device, config.bf16):
            logits = ddp_model(x)
        loss_sum, correct = _loss_terms(logits, y)
        # DDP averages gradients over ranks: scale so the result is (global sum) / (global count).
        (loss_sum * (world / count)).backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sums += torch.stack([loss_sum.detach().double(), correct.double(), y.ne(IGNORE).sum().double()])
        train_time += time.perf_counter() - t0
        train_tokens += tokens.numel()
        done = step + 1

        record: dict[str, Any] = {}
        if done % config.log_every == 0 or done == config.steps:
            if world > 1:
                dist.all_reduce(sums)
            loss_v, correct_v, count_v = sums.tolist()
            record.update(loss=loss_v / count_v, acc=correct_v / count_v, lr=scheduler.get_last_lr()[0])
            sums.zero_()
        if done % config.eval_every == 0 or done == config.steps:
            if rank == 0:
                record.update(evaluate(model, test_tokens, test_targets, batch_size=local, bf16=config.bf16))
        if record and rank == 0:
            record = {"step": done, **record}
            history.append(record)
            if metrics_path is not None:
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "acc", "test_acc")})
        bar.update(1)
        if ckpt_path is not None and (done % ckpt_every == 0 or done == config.steps or done == last):
            if world > 1:  # rank 0 saves the global partial sums; the other ranks restart theirs
                dist.all_reduce(sums)
                if rank != 0:
                    sums.zero_()
        if ckpt_path is not None and rank == 0 and (
            done % ckpt_every == 0 or done == config.steps or done == last
        ):
            save_checkpoint(ckpt_path, step=done, config=config, model=model, optimizer=optimizer,
                            scheduler=scheduler, device=device, log_sums=sums)
    bar.close()
    if world > 1:
        dist.barrier()  # rank 0's last checkpoint is on disk before anyone returns
    final = next((r for r in reversed(history) if "test_acc" in r), {})
    tok_s = train_tokens / train_time if train_time > 0 else float("nan")
    return TrainResult(model=model, history=history, final=final, train_tokens_per_s=tok_s, out=out)
