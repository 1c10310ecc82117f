"""The files of a run directory: resumable checkpoints (model, optimizer, schedule, every RNG
state), ``metrics.jsonl``, and the clean-up of what a killed run left behind. Every write is atomic
(:func:`hybridssm.io.atomic_write`) and a failed write is one :class:`RunFileError` line."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hybridssm.io import atomic_write
from hybridssm.training.config import TrainConfig

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"  # the run's settings and the task's chance level (read by `hybridssm plot`)
MODEL_DIR = "model"  # the trained task model, written when the run finishes (``hs.load``)
CHECKPOINT_FORMAT = "hybridssm-train-checkpoint"
CHECKPOINT_VERSION = 1

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, corrupt, or from a different run."""



class RunFileError(OSError):
    """A run file (checkpoint, metrics) could not be written: a full disk, permissions, a path
    that is not a directory. The message names the file and the reason, on one line."""


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
    the free space on that disk is named where the disk may be full (no space, quota, or torch's
    errno-less error), not for a read-only disk or a missing permission."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, (OSError, RuntimeError)) or isinstance(exc, RunFileError):
            return False
        code = getattr(exc, "errno", None) or 0
        reason = os.strerror(code) if code else (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        free = ""
        if code in (0, errno.ENOSPC, errno.EDQUOT):  # not for a read-only disk or a permission
            try:
                free = f"; {shutil.disk_usage(self.path.parent).free / 2**20:,.0f} MiB free on that disk"
            except OSError:
                pass
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
    an unreadable line elsewhere, or one that is not an object with an integer ``step``, raises
    :class:`CheckpointError` naming it.
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
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                log.warning("%s: dropping a torn last line (%d bytes; a write was cut short)",
                            path, len(line))
                break
            raise CheckpointError(f"{path} line {i + 1} is not a JSON record ({exc}); "
                                  "remove that line to resume") from exc
        if not isinstance(record, dict) or type(record.get("step")) is not int:  # edited by hand
            raise CheckpointError(f"{path} line {i + 1} is not a metrics record (a JSON object with "
                                  f"an integer 'step'), got {line.strip()[:80]}; remove that line")
        records.append(record)
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
