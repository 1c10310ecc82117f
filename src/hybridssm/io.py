"""Files the library writes and reads: names, the format version, atomic writes, save and load.

A saved model is a directory with two files:

* ``config.json``: ``{"format_version": 1, "model": NAME, "dtype": "float32", "config": {...}}``,
  the registered model name, the dtype its computing parameters had, and its config's options;
* ``model.safetensors``: the state dict (no pickle runs when it is read).

:func:`load` trusts neither file: it checks the config's structure and values, then compares the
shapes and dtypes in the safetensors *header* with those the config implies (a model built on the
meta device) before any weight is allocated, so a wrong or hostile pair of files fails in
milliseconds with a ``ValueError`` naming the file and the problem.

Every file the library writes (models, training checkpoints, metrics) goes through
:func:`atomic_write`: a reader sees the old file or the new one, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "TEMP_SUFFIX",
    "atomic_write",
    "save_pretrained",
    "load",
]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: temporary files are ``.<target name>.<random>.tmp`` beside their target
TEMP_SUFFIX = ".tmp"

# A config is a few hundred bytes with at most a few levels of nesting (backbone_options); these
# bounds only keep a hostile file from costing memory or recursion before it is refused.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 16

# The dtypes a saved model may record (what save_pretrained writes: its computing dtype).
_FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                 "float16": torch.float16, "bfloat16": torch.bfloat16}
# safetensors' header names of the dtypes a state dict can hold
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


# -- atomic writes --------------------------------------------------------------------------------
def atomic_write(target: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write ``target`` through ``write(tmp)``, which writes a temporary path in the same directory;
    the temporary file is then fsynced and renamed over ``target`` (``os.replace``) and the
    directory fsynced, so a crash at any point leaves the old file or the new one, never a partial
    file, and a finished call survives a power loss.

    The file gets the mode the process's umask gives a new file (``0o666 & ~umask``), as
    ``open(target, "w")`` would. On any error the temporary file is removed and the error raised;
    a process killed mid-write leaves ``.<name>.<random>.tmp`` (:data:`TEMP_SUFFIX`) behind.
    A Ctrl-C (SIGINT, in the main thread, under Python's own handler) during the write waits for
    the file to be complete and then raises ``KeyboardInterrupt``: interrupted inside
    ``torch.save``, the zip writer would turn it into a write error and lose the file.
    """
    target = Path(target)
    with _interrupt_after():
        tmp = _create_temp(target)
        mode = stat.S_IMODE(tmp.stat().st_mode)  # the umask's mode, applied by the kernel
        try:
            write(tmp)
            if stat.S_IMODE(tmp.stat().st_mode) != mode:  # a writer that replaced the file
                os.chmod(tmp, mode)
            _fsync_path(tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
    return target


@contextlib.contextmanager
def _interrupt_after():
    """Hold back SIGINT until the block ends, then raise ``KeyboardInterrupt`` (also when the
    block raised: the user asked to stop). Only where Python's default handler is installed and in
    the main thread (the only one that may set handlers); elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if caught:
            raise KeyboardInterrupt


def _create_temp(target: Path) -> Path:
    # os.open with 0o666 lets the kernel apply the umask (and a directory's default ACL), which
    # mkstemp's fixed 0o600 would not; O_EXCL makes the random name ours alone.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - a 48-bit name collision
            continue


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; platforms that cannot open a directory (Windows) skip it."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - not on POSIX
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems that do not sync directories
        pass
    finally:
        os.close(fd)


# -- save -----------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None,
                    backbone: nn.Module | None = None) -> Path:
    """Write ``model``'s :data:`CONFIG_FILE` and :data:`WEIGHTS_FILE` into the directory ``path``
    (created if needed); see :meth:`hybridssm.SequenceModel.save_pretrained`.

    A model that wraps a registered model (``hybridssm train``'s task model) passes that model as
    ``backbone`` (its name, config and dtype go in the config file) and its own entries as ``extra``
    (e.g. ``{"task_model": {...}}``, read back by :func:`load`); every weight of ``model`` is saved."""
    from safetensors.torch import save_file

    path = Path(path)
    inner = backbone if backbone is not None else model
    meta = {
        "format_version": FORMAT_VERSION,
        "model": inner.model_name,
        "dtype": str(inner._compute_dtype()).removeprefix("torch."),
        "config": inner.config.to_dict(),
        **(extra or {}),
    }
    text = json.dumps(meta, indent=2)  # fails here (before writing) on unsavable options
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # weights first: a crash between the two leaves the old config, which the check in load
    # compares against the new weights (a mismatch is refused, never loaded wrongly)
    atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write(path / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return path


# -- load -----------------------------------------------------------------------------------------
def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model saved by ``save_pretrained(path)``, in eval mode, on ``map_location``.

    Raises ``FileNotFoundError`` when a file is missing and ``ValueError`` (naming the file) for a
    corrupt or foreign config, an unknown model or format version, or weights whose names, shapes
    or dtypes differ from those the config implies; these checks read only the config and the
    safetensors header, so nothing is allocated for a file that is refused. Weights are never cast:
    a file whose tensors are not in the recorded dtype is refused.
    """
    path = Path(path)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (cfg_path, w_path):
        if not f.is_file():
            from hybridssm.training.files import MODEL_DIR  # only on this error path

            # The directory of a `train --out` run holds its model one level down.
            run_model = path / MODEL_DIR
            hint = f" (a training run: load {run_model})" if (run_model / CONFIG_FILE).is_file() else ""
            raise FileNotFoundError(f"{f} not found: expected a directory written by "
                                    f"save_pretrained{hint}")
    saved = read_config(cfg_path)
    found = {saved.current_name(k): v for k, v in read_header(w_path).items()}
    expected = _expected_tensors(saved, found, w_path, cfg_path)
    check_weights(found, expected, w_path, cfg_path)

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = saved.build().to(saved.dtype)
    try:
        tensors = {saved.current_name(k): v for k, v in load_file(str(w_path), device="cpu").items()}
    except (SafetensorError, OSError, RuntimeError) as exc:  # e.g. truncated since the check
        raise ValueError(f"{w_path} is corrupted or unreadable: {exc}") from None
    model.load_state_dict(tensors)
    return model.to(map_location).eval()


class SavedConfig(NamedTuple):
    """What a :data:`CONFIG_FILE` describes: ``build()`` makes the model (fresh weights; a
    ``task_model`` entry wraps it as ``hybridssm train``'s task model) of registered model ``name``
    with ``config``, saved in ``dtype``."""

    build: Callable[[], nn.Module]
    name: str
    config: Any
    dtype: torch.dtype
    #: old weight name -> new, for files written before a weight was renamed
    renamed: Mapping[str, str]

    def current_name(self, key: str) -> str:
        """``key`` as the model names it now (``meta`` -> ``meta_embedding``, also under a prefix)."""
        head, _, last = key.rpartition(".")
        new = self.renamed.get(last)
        return key if new is None else (f"{head}.{new}" if head else new)


def read_config(cfg_path: Path) -> SavedConfig:
    """The :class:`SavedConfig` of a :data:`CONFIG_FILE`.
    ``ValueError`` naming the file and the problem for anything else (never a
    ``TypeError``/``RecursionError`` from the parse)."""
    from hybridssm.registry import get_model_class

    def bad(problem: str) -> ValueError:
        return ValueError(f"{cfg_path} is corrupted or not a hybridssm config: {problem}")

    if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
        raise bad(f"{cfg_path.stat().st_size} bytes (a config has at most {MAX_CONFIG_BYTES})")
    try:
        meta = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise bad(f"nested deeper than {MAX_CONFIG_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise bad(f"not valid JSON ({exc})") from None
    if _depth(meta) > MAX_CONFIG_DEPTH:
        raise bad(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object at the top level, got {_json_type(meta)}")
    for key in ("format_version", "model", "dtype", "config"):
        if key not in meta:
            raise bad(f"missing key {key!r}")
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise bad(f"'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path}: format_version {version} is newer than this hybridssm reads "
            f"({FORMAT_VERSION}); upgrade hybridssm"
        )
    if version < 1:
        raise bad(f"unknown format_version {version} (this hybridssm reads 1..{FORMAT_VERSION})")
    name, options, dtype_name = meta["model"], meta["config"], meta["dtype"]
    if not isinstance(name, str):
        raise bad(f"'model' must be a model name (a string), got {_json_type(name)}")
    if not isinstance(options, dict):
        raise bad(f"'config' must be a JSON object of options, got {_json_type(options)}")
    if not isinstance(dtype_name, str) or dtype_name not in _FLOAT_DTYPES:
        raise bad(f"'dtype' must be one of {', '.join(map(repr, _FLOAT_DTYPES))}, got {dtype_name!r}")
    try:
        model_class = get_model_class(name)
    except ValueError as exc:  # unknown name, with a suggestion
        raise ValueError(f"{cfg_path}: {exc}") from None
    try:
        config = model_class.config_class.from_dict(options)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        # the config's own message names the option, the value and what is allowed
        raise ValueError(f"{cfg_path}: invalid options for model {name!r}: {exc}") from None
    renamed = dict(getattr(model_class, "renamed_weights", {}))
    task_spec = meta.get("task_model")
    if task_spec is None:
        return SavedConfig(lambda: model_class(config), name, config, _FLOAT_DTYPES[dtype_name], renamed)
    from hybridssm.tasks.model import TaskModel

    try:
        TaskModel.check_spec(task_spec)
    except ValueError as exc:
        raise bad(str(exc)) from None
    return SavedConfig(lambda: TaskModel.around(model_class(config), task_spec), name, config,
                       _FLOAT_DTYPES[dtype_name], renamed)


def read_header(w_path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype name)}`` from a safetensors header; no tensor is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(w_path), framework="pt") as f:
            found = {}
            for key in f.keys():
                view = f.get_slice(key)
                found[key] = (tuple(view.get_shape()), view.get_dtype())
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{w_path} is corrupted or unreadable: {exc}") from None
    return found


def _expected_tensors(
    saved: SavedConfig, found: Mapping[str, Any], w_path: Path, cfg_path: Path,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the state dict ``config`` implies, from a meta-device model."""
    # Building costs time per layer even on the meta device: a config claiming more layers than
    # the file holds (num_layers=10**6) is refused before it is built.
    blocks = {int(m.group(1)) for k in found if (m := re.match(r"(?:backbone\.)?blocks\.(\d+)\.", k))}
    num_layers = getattr(saved.config, "num_layers", 0)
    if blocks and num_layers > max(blocks) + 1:
        held = max(blocks) + 1
        raise ValueError(
            f"{w_path} does not match {cfg_path}: missing weights of blocks {held}..{num_layers - 1} "
            f"(the config has num_layers={num_layers}, the file holds {held} blocks)"
        )
    try:
        with torch.device("meta"):
            model = saved.build().to(saved.dtype)
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        # torch's message may carry a C++ stack trace after its first line
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{cfg_path}: cannot build {saved.name!r} from it: {reason}") from None
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def check_weights(
    found: Mapping[str, tuple[tuple[int, ...], str]],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    w_path: Path,
    cfg_path: Path,
) -> None:
    """Compare the header's tensors (:func:`read_header`) with ``expected``; ``ValueError`` naming
    each tensor that is missing, unexpected, or of another shape or dtype (expected and found)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing weights {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected weights {_some(unexpected)}")
    for key in (k for k in expected if k in found):  # in the model's order: input first
        (want_shape, want_dtype), (shape, dtype_name) = expected[key], found[key]
        if shape != want_shape:
            problems.append(f"{key}: config wants shape {want_shape}, file has {shape}")
        elif _SAFETENSORS_DTYPES.get(dtype_name) != want_dtype:
            got = _SAFETENSORS_DTYPES.get(dtype_name, dtype_name)
            problems.append(f"{key}: config wants dtype {want_dtype}, file has {got}")
    if problems:
        more = f"; ... ({len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{w_path} does not match {cfg_path}: " + "; ".join(problems[:5]) + more)


def _some(names: list[str]) -> str:
    return f"{names[:5]}{' ...' if len(names) > 5 else ''}"


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion (the value may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_CONFIG_DEPTH:  # deeper levels need no visit: already too deep
                stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest
