"""The training loop: :func:`train` (single process or data parallel), the loss and
:func:`evaluate`."""

from __future__ import annotations

import datetime
import errno
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from hybridssm.io import atomic_write
from hybridssm.tasks import IGNORE, Task, TaskModel
from hybridssm.training.config import TrainConfig, build_task_model, lr_factor
from hybridssm.training.files import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    MODEL_DIR,
    RUN_FILE,
    CheckpointError,
    RunFileError,
    _append_metrics,
    _remove_orphans,
    _set_rng_states,
    _write_metrics,
    _writing,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
)

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """The loss became non-finite more often than ``max_nonfinite`` allows; ``step`` is the step
    (1-based) that stopped the run. The last checkpoint on disk holds finite weights."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step



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
            log.info("resuming from step %d (%s)", start, ckpt_path)
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
