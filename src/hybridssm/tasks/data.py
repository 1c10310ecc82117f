"""Your own data: float frames from a ``.npz``, ``.safetensors`` or ``.pt`` file, as a task.

Arrays (by name):

* ``x [N, T, E]`` float: N sequences of T frames of E features (required);
* ``y`` (optional), what is predicted:

  ==================  ===========  ================================================
  shape               dtype        task
  ==================  ===========  ================================================
  ``[N]``             integer      one class per sequence (read at its last frame)
  ``[N, T]``          integer      one class per frame
  ``[N, E']``         float        regression of one vector per sequence
  ``[N, T, E']``      float        regression of one vector per frame
  absent              -            next-frame regression: frame t predicts frame t + 1
  ==================  ===========  ================================================

* ``lengths [N]`` integer (optional): sequence ``i`` is ``x[i, :lengths[i]]`` (right padding,
  never scored; the models are causal, so padding never reaches the valid frames).

Classes are ``0 .. C - 1`` with ``C = max(y) + 1``; the loss is cross-entropy (accuracy is
reported) or the mean squared error per scored value. A fixed ``val_fraction`` of the sequences,
chosen by a permutation with seed 0 (the same for every run on the file), is held out for
evaluation. Training batch ``s`` takes the next rows of a per-epoch permutation drawn from
``(seed, epoch)``, so a batch is a pure function of ``(seed, s)``, as for the synthetic tasks.

No pickle ever runs: ``.npz`` is read with ``allow_pickle=False`` and ``.pt`` with
``torch.load(weights_only=True)`` (a dict of tensors).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from hybridssm.tasks.base import IGNORE, Task, derive_seed

__all__ = ["ArrayData", "load_arrays", "SUFFIXES"]

SUFFIXES = (".npz", ".safetensors", ".pt")
NAMES = ("x", "y", "lengths")


def load_arrays(path: str | os.PathLike) -> dict[str, Tensor]:
    """The named arrays of a data file as CPU tensors; never runs pickle."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"data file {path}: the suffix must be one of {', '.join(SUFFIXES)}, "
                         f"got {path.suffix or 'none'!r}")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {k: torch.from_numpy(np.ascontiguousarray(archive[k])) for k in archive.files}
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return load_file(str(path))
            except SafetensorError as exc:  # a corrupt file: reported below like the others
                raise ValueError(str(exc)) from exc
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"data file {path} cannot be read as .pt arrays: it holds objects other "
                         "than tensors, and no pickle is run (weights_only=True)") from exc
    except (ValueError, OSError, RuntimeError, EOFError, TypeError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"data file {path} cannot be read as {path.suffix} arrays: {first}") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                            for k, v in obj.items()):
        raise ValueError(f"data file {path}: a .pt file must hold a dict of named tensors "
                         f"(x, y, lengths), got {type(obj).__name__}")
    return obj


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Prepared(NamedTuple):
    x: Tensor  # [N, T, E] float32, zeros in the padding
    y: Tensor | None  # as given (labels long, targets float32)
    lengths: Tensor  # [N] long
    kind: str  # class_seq | class_frame | reg_seq | reg_frame | next_frame
    num_outputs: int
    train_rows: Tensor  # [N_train] long
    val_rows: Tensor  # [N_val] long
    digest: str = ""  # sha256 of the file


def _first_bad(bad: Tensor, dims: tuple[str, ...]) -> str:
    where = bad.nonzero()[0].tolist()
    return ", ".join(f"{d} {i}" for d, i in zip(dims, where))


def _check_finite(name: str, t: Tensor, dims: tuple[str, ...], path: Path) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        value = t[tuple(bad.nonzero()[0])].item()
        raise ValueError(f"data file {path}: {name} has a non-finite value ({value}) at "
                         f"{_first_bad(bad, dims)} ({int(bad.sum())} such value(s) in all)")


def prepare(arrays: dict[str, Tensor], path: Path, val_fraction: float) -> Prepared:
    """Validate the arrays (names, shapes, dtypes, values) and split rows; errors name the array."""
    unexpected = sorted(set(arrays) - set(NAMES))
    if unexpected:
        raise ValueError(f"data file {path}: unexpected array(s) {', '.join(map(repr, unexpected))}; "
                         "expected 'x' and optionally 'y' and 'lengths'")
    if "x" not in arrays:
        raise ValueError(f"data file {path} has no array 'x' (float frames [N, T, E]); arrays found: "
                         f"{', '.join(map(repr, sorted(arrays))) or 'none'}")
    x = arrays["x"]
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"data file {path}: x must be float frames [N, T, E], got {x.dtype} "
                         f"{list(x.shape)}" + ("" if x.is_floating_point() else
                                               " (cast it, e.g. x.astype(np.float32))"))
    N, T, E = x.shape
    if N < 2 or T < 1 or E < 1:
        raise ValueError(f"data file {path}: x needs at least 2 sequences, 1 frame and 1 feature, "
                         f"got shape {list(x.shape)}")
    x = x.float()
    lengths = arrays.get("lengths")
    if lengths is None:
        lengths = torch.full((N,), T, dtype=torch.long)
    else:
        if lengths.shape != (N,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(f"data file {path}: lengths must be integers [N] = [{N}], got "
                             f"{lengths.dtype} {list(lengths.shape)}")
        lengths = lengths.long()
        bad = (lengths < 1) | (lengths > T)
        if bad.any():
            row = int(bad.nonzero()[0])
            raise ValueError(f"data file {path}: lengths must be in 1..T = 1..{T}, got "
                             f"{int(lengths[row])} at row {row}")
    valid = torch.arange(T) < lengths[:, None]  # [N, T]
    x = x.masked_fill(~valid[..., None], 0.0)  # the padding is never read as data
    _check_finite("x", x, ("row", "frame", "column"), path)

    y = arrays.get("y")
    if y is None:
        if T < 2:
            raise ValueError(f"data file {path}: without y the task is next-frame regression, "
                             f"which needs T >= 2 frames, got T = {T}")
        kind, outputs = "next_frame", E
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"data file {path}: y must be integer class labels or float regression "
                         f"targets, got {y.dtype}")
    elif not y.is_floating_point():
        if y.shape not in ((N,), (N, T)):
            raise ValueError(f"data file {path}: integer y (class labels) must be [N] = [{N}] (one "
                             f"per sequence) or [N, T] = [{N}, {T}] (one per frame), got {list(y.shape)}")
        y = y.long()
        kind = "class_seq" if y.dim() == 1 else "class_frame"
        scored = y if y.dim() == 1 else y[valid]
        if (scored < 0).any():
            bad = (y < 0) if y.dim() == 1 else (y < 0) & valid
            raise ValueError(f"data file {path}: class labels must be >= 0, got "
                             f"{int(y[tuple(bad.nonzero()[0])])} at {_first_bad(bad, ('row', 'frame'))}")
        outputs = int(scored.max()) + 1
        if outputs < 2:
            raise ValueError(f"data file {path}: y holds a single class (0); classification "
                             "needs at least 2")
    else:
        if y.dim() not in (2, 3) or y.shape[0] != N or (y.dim() == 3 and y.shape[1] != T):
            raise ValueError(f"data file {path}: float y (regression targets) must be [N, E'] = "
                             f"[{N}, E'] or [N, T, E'] = [{N}, {T}, E'], got {list(y.shape)}"
                             + (" (class labels must be integers; for one value per sequence use "
                                "y[:, None])" if y.dim() == 1 else ""))
        y = y.float()
        if y.dim() == 3:
            y = y.masked_fill(~valid[..., None], 0.0)
            _check_finite("y", y, ("row", "frame", "column"), path)
        else:
            _check_finite("y", y, ("row", "column"), path)
        kind, outputs = ("reg_seq" if y.dim() == 2 else "reg_frame"), y.shape[-1]

    n_val = max(1, round(N * val_fraction))
    if N - n_val < 1:
        raise ValueError(f"task option 'val_fraction' = {val_fraction} leaves no training sequence "
                         f"out of {N}")
    order = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    return Prepared(x, y, lengths, kind, outputs, order[: N - n_val].sort().values,
                    order[N - n_val :].sort().values)


@functools.lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int, size: int, val_fraction: float) -> Prepared:
    return prepare(load_arrays(path), Path(path), val_fraction)._replace(digest=_sha256(path))


@dataclass(frozen=True, kw_only=True)
class ArrayData(Task):
    """Options: ``path`` (a .npz, .safetensors or .pt file of named arrays: see the module
    docstring), ``val_fraction`` (held-out share of the sequences, in (0, 1), default 0.1)."""

    name = "data"

    path: str = ""
    val_fraction: float = 0.1

    def validate(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"task option 'path' must name a {', '.join(SUFFIXES)} file of arrays "
                             f"(--data FILE), got {self.path!r}")
        f = self.val_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ValueError(f"task option 'val_fraction' must be a number in (0, 1), got {f!r}")
        p = Path(self.path)
        stat = p.stat() if p.is_file() else None
        load = _cached if stat else (lambda *a: prepare(load_arrays(p), p, f))  # the missing-file error
        data = load(str(p.resolve()) if stat else str(p), stat.st_mtime_ns if stat else 0,
                    stat.st_size if stat else 0, float(f))
        object.__setattr__(self, "_data", data)  # frozen options; the arrays are derived state

    @property
    def data(self) -> Prepared:
        return self._data  # type: ignore[attr-defined]

    @property
    def digest(self) -> str:
        return self.data.digest

    @property
    def vocab_size(self) -> None:  # type: ignore[override]
        return None  # float frames: no embedding

    @property
    def input_dim(self) -> int:
        return self.data.x.shape[-1]

    @property
    def num_outputs(self) -> int:
        return self.data.num_outputs

    @property
    def num_classes(self) -> int:
        return self.data.num_outputs

    @property
    def regression(self) -> bool:
        return self.data.kind in ("reg_seq", "reg_frame", "next_frame")

    @property
    def chance(self) -> float | None:
        return None if self.regression else 1.0 / self.data.num_outputs

    def seq_len_for(self, split: str) -> int:
        return self.data.x.shape[1]

    def batch(self, seed: int, split: str, index: int, n: int) -> tuple[Tensor, Tensor]:
        """``(x [n, T, E], targets)``: train batch ``index`` of the run ``seed``, or (``"test"``)
        the first ``n`` held-out sequences. Targets are ``[n, T]`` labels with ``IGNORE`` where
        not scored, or ``[n, T, E']`` float with NaN where not scored."""
        d = self.data
        if split == "test":
            rows = d.val_rows[:n]
        else:
            derive_seed(seed, split, index)  # validates split
            rows = self._train_rows(seed, index, n)
        return d.x[rows], self._targets(rows)

    def _train_rows(self, seed: int, index: int, n: int) -> Tensor:
        rows, m, pos, parts = self.data.train_rows, len(self.data.train_rows), index * n, []
        while n > 0:  # a batch may run over the end of an epoch into the next one
            epoch, offset = divmod(pos, m)
            gen = torch.Generator().manual_seed(derive_seed(seed, "train", epoch))
            take = torch.randperm(m, generator=gen)[offset : offset + n]
            parts.append(take)
            pos, n = pos + len(take), n - len(take)
        return rows[torch.cat(parts)]

    def _targets(self, rows: Tensor) -> Tensor:
        d = self.data
        lengths, T = d.lengths[rows], d.x.shape[1]
        valid = torch.arange(T) < lengths[:, None]  # [n, T]
        last = (torch.arange(len(rows)), lengths - 1)
        if d.kind == "class_frame":
            return d.y[rows].masked_fill(~valid, IGNORE)
        if d.kind == "class_seq":
            out = torch.full((len(rows), T), IGNORE, dtype=torch.long)
            out[last] = d.y[rows]
            return out
        if d.kind == "reg_frame":
            return d.y[rows].masked_fill(~valid[..., None], math.nan)
        if d.kind == "reg_seq":
            out = torch.full((len(rows), T, d.num_outputs), math.nan)
            out[last] = d.y[rows]
            return out
        x = d.x[rows]  # next frame: position t is scored when frame t + 1 is valid
        out = torch.full_like(x, math.nan)
        out[:, :-1] = x[:, 1:].masked_fill(~valid[:, 1:, None], math.nan)
        return out

    def describe(self) -> dict[str, Any]:
        """Sizes and the kind of target, for messages and plots."""
        d = self.data
        return {"sequences": d.x.shape[0], "frames": d.x.shape[1], "features": d.x.shape[2],
                "target": d.kind, "outputs": d.num_outputs, "train": len(d.train_rows),
                "held_out": len(d.val_rows)}
