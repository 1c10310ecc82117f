"""Build (once, cached) the fused CPU kernels in ``ops/csrc`` with ``torch.utils.cpp_extension``.

The build defines ``CPU_CAPABILITY`` from :func:`torch.backends.cpu.get_cpu_capability`: without it
``at::vec::Vectorized`` silently compiles to its generic scalar code (REFERENCES, Mamba-1 speed).

**The cache.** A build is ``<root>/hybridssm/<name>.so`` with ``<root>`` torch's extension cache
(``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). The name carries a hash of
everything the binary depends on (:func:`cache_key`): torch's version and build, its C++ ABI, the
Python ABI, the CPU capability and compiler flags, the source and the headers it includes. So
virtual environments with different torch installs keep their own builds side by side (switching
between them never rebuilds), and no process loads a build made for another torch or other sources.

**Concurrency.** A build compiles in its own temporary directory and is renamed into place, so a
reader never sees half a file. Builders of one name take an ``flock`` on ``<name>.lock``: the second
process waits (saying so on stderr, once) and then loads what the first built. The OS drops an
``flock`` with its process, so a build killed part-way leaves no lock behind: the next process
takes it and builds again. A wait longer than ``HYBRIDSSM_BUILD_TIMEOUT`` seconds (default 900)
gives up with :class:`KernelBuildError`, so a hung builder never hangs its waiters.

**Messages.** One line on stderr while a kernel builds; a failed build raises
:class:`KernelBuildError` naming the compiler log it wrote (``<name>.log``), which the dispatcher
turns into one warning for the whole process (:mod:`hybridssm.ops._kernels`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "load_extension", "cpu_capability_flags", "kernel_probe", "build_status", "cache_dir", "cache_key",
    "included_files", "KernelBuildError", "Extension",
]

CSRC = Path(__file__).parent / "csrc"
BUILD_TIMEOUT_ENV = "HYBRIDSSM_BUILD_TIMEOUT"


class KernelBuildError(RuntimeError):
    """A fused kernel could not be built (or waited for); ``log`` is the compiler log, if one was written."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


def cpu_capability_flags() -> tuple[str, list[str]]:
    """``(capability, compiler flags)`` for the SIMD level torch itself dispatches to here."""
    cap = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    if cap == "AVX512":
        return cap, ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw",
                     "-mavx512vl", "-mavx512dq", "-mfma"]
    if cap == "AVX2":
        return cap, ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]


def cache_dir() -> Path:
    """Where the builds live: ``$TORCH_EXTENSIONS_DIR/hybridssm`` (default under ``~/.cache``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "torch_extensions"
    )
    return Path(root) / "hybridssm"


_QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def included_files(source: Path, headers: Path) -> list[Path]:
    """``source`` and every file it includes with ``#include "..."``, transitively: each name is
    looked up beside the including file (as the compiler does), then under ``headers``. Names found in
    neither (torch's and the system's headers) are left out: torch's version is in the key."""
    seen: dict[Path, None] = {}
    todo = [source.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for name in _QUOTED_INCLUDE.findall(path.read_text(errors="replace")):
            for base in (path.parent, headers):
                candidate = (base / name).resolve()
                if candidate.is_file():
                    todo.append(candidate)
                    break
    return sorted(seen)


def cache_key(source: Path, headers: Path, flags: list[str]) -> str:
    """A hash of everything a build depends on: torch (version, git revision, C++ ABI), Python's
    extension ABI, the compiler flags, the source and the project headers it includes (transitively,
    :func:`included_files`), so an edit to one kernel's header rebuilds only the kernels that use it."""
    h = hashlib.sha256()
    for part in (
        torch.__version__, getattr(torch.version, "git_version", ""), str(torch._C._GLIBCXX_USE_CXX11_ABI),
        sys.implementation.cache_tag, sys.platform, " ".join(flags),
    ):
        h.update(part.encode() + b"\0")
    root = headers.resolve()
    for path in included_files(source, headers):
        name = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
        h.update(str(name).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Extension:
    """One extension module: ``source`` compiled with ``cflags``; ``headers`` is the folder of the project's
    headers; those the source includes (transitively) are hashed into the name."""

    stem: str
    source: Path
    headers: Path
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()

    @functools.cached_property
    def name(self) -> str:
        """The module name (``TORCH_EXTENSION_NAME``), unique to this build's inputs."""
        cap = torch.backends.cpu.get_cpu_capability().lower()
        return f"hybridssm_{self.stem}_{cap}_{cache_key(self.source, self.headers, list(self.cflags))}"

    def path(self, suffix: str) -> Path:
        return cache_dir() / f"{self.name}{suffix}"


@functools.cache
def _csrc_extension(stem: str) -> Extension:
    _, flags = cpu_capability_flags()
    return Extension(stem, CSRC / f"{stem}.cpp", CSRC, ("-O3", "-fopenmp", *flags), ("-fopenmp",))


# -- loading ---------------------------------------------------------------------------------------

_LOCK = threading.Lock()  # one build at a time within the process (the flock serialises processes)
_LOADED: dict[str, ModuleType | KernelBuildError] = {}  # by module name; a failure is remembered
_BY_STEM: dict[str, ModuleType] = {}  # the hot path: every fused op's call looks its module up here


def load_extension(stem: str) -> ModuleType:
    """``csrc/<stem>.cpp`` compiled for this CPU and torch: loaded from the cache, else built (first
    use; about a minute). A failed build is remembered: later calls raise the same error at once."""
    module = _BY_STEM.get(stem)
    if module is None:
        module = _BY_STEM[stem] = load(_csrc_extension(stem))
    return module


def load(ext: Extension) -> ModuleType:
    """Load ``ext`` from the cache, building it first if needed (see the module docstring)."""
    result = _LOADED.get(ext.name)
    if result is None:
        with _LOCK:
            result = _LOADED.get(ext.name)
            if result is None:
                try:
                    result = _load_or_build(ext)
                except KernelBuildError as exc:
                    result = exc
                _LOADED[ext.name] = result
    if isinstance(result, KernelBuildError):
        raise result
    return result


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_or_build(ext: Extension) -> ModuleType:
    so = ext.path(".so")
    if so.exists():  # renamed into place whole: no lock needed to read it
        with contextlib.suppress(ImportError, OSError):
            return _import(ext.name, so)
    with _build_lock(ext):
        if so.exists():  # another process built it while we waited
            with contextlib.suppress(ImportError, OSError):
                return _import(ext.name, so)
        return _build(ext, so)


@contextlib.contextmanager
def _build_lock(ext: Extension) -> Iterator[None]:
    import fcntl

    lock_path = ext.path(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        timeout = float(os.environ.get(BUILD_TIMEOUT_ENV, "900"))
    except ValueError:
        raise KernelBuildError(f"{BUILD_TIMEOUT_ENV} must be a number of seconds, got "
                               f"{os.environ[BUILD_TIMEOUT_ENV]!r}") from None
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, told = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() > deadline:
                    raise KernelBuildError(
                        f"gave up after {timeout:.0f} s waiting for process {owner} to build {ext.stem} "
                        f"(lock {lock_path}; {BUILD_TIMEOUT_ENV} sets the wait)"
                    ) from None
                if not told:
                    told = True
                    _say(f"waiting for process {owner} to finish building fused CPU kernels "
                         f"in {lock_path.parent}…")
                time.sleep(0.25)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _say(line: str) -> None:
    sys.stderr.write(f"hybridssm: {line}\n")
    sys.stderr.flush()


def _build(ext: Extension, so: Path) -> ModuleType:
    from torch.utils.cpp_extension import load as torch_load

    # Leftovers of builds killed part-way (we hold the lock: nobody else builds this name now).
    for stale in so.parent.glob(f"{ext.name}.build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    build_dir = so.parent / f"{ext.name}.build-{os.getpid()}"
    build_dir.mkdir()
    log = ext.path(".log")
    _say(f"building fused CPU kernels (first use, cached in {so.parent})… [{ext.stem}]")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = torch_load(
                name=ext.name, sources=[str(ext.source)], extra_cflags=list(ext.cflags),
                extra_ldflags=list(ext.ldflags), build_directory=str(build_dir), verbose=False,
            )
        os.replace(build_dir / f"{ext.name}.so", so)  # the loaded module keeps working: same inode
        log.unlink(missing_ok=True)
        return module
    except Exception as exc:  # the compiler's output goes to the log, not the console
        text = "".join(traceback.format_exception(exc))
        text += "".join(f"\nwarning: {w.message}" for w in caught)
        log.write_text(text)
        message = f"could not compile {ext.source.name}{_first_error(text)} (compiler log: {log})"
        raise KernelBuildError(message, log) from None
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def _first_error(text: str) -> str:
    for line in text.splitlines():  # the compiler's first diagnostic, e.g. "x.cpp:3:1: error: ..."
        if "error:" in line:
            return f": {line.strip()[:160]}"
    return ""


# -- status and probes -----------------------------------------------------------------------------


def build_status(stem: str) -> tuple[bool | None, str]:
    """What loading ``csrc/<stem>.cpp`` would do now, without building or loading anything:
    ``(True, ...)`` loaded in this process, ``(False, ...)`` failed in this process, ``(None, ...)``
    not loaded yet (a cached build is present, or it builds on first use)."""
    ext = _csrc_extension(stem)
    done = _LOADED.get(ext.name)
    if isinstance(done, ModuleType):
        return True, "loaded"
    if done is not None:
        return False, f"build failed: {done}"
    if ext.path(".so").exists():
        return None, f"cached build present ({ext.path('.so')}); loads on first use"
    return None, f"not built yet; builds on first use (about a minute), cached in {cache_dir()}"


def kernel_probe(source: str, what: str) -> Callable[[str], tuple[bool, str]]:
    """A ``fused_probe`` for :func:`hybridssm.ops._kernels.register`: CPU only, builds
    ``csrc/<source>.cpp`` on first use (a failed build raises, and the dispatcher falls back).
    ``probe.peek(device_type)`` says the same without building (for ``hs.kernels()``).

    The probe runs for real, not traced, when an op's first call happens inside ``torch.compile``:
    its result is a constant of the process, and dynamo cannot trace a build."""

    def probe(device_type: str) -> tuple[bool, str]:
        if device_type != "cpu":
            return False, f"the fused {what} runs on CPU only"
        load_extension(source)
        return True, f"fused C++ kernel ({cpu_capability_flags()[0]})"

    def peek(device_type: str) -> tuple[bool | None, str]:
        if device_type != "cpu":
            return False, f"the fused {what} runs on CPU only"
        ok, reason = build_status(source)
        return ok, f"fused C++ kernel ({cpu_capability_flags()[0]})" if ok else reason

    # What torch.compiler.assume_constant_result sets; that function imports torch._dynamo (seconds
    # at ``import hybridssm``) only to set this attribute. tests/ops/test_scan.py compiles a first call.
    probe._dynamo_marked_constant = True
    probe.peek = peek
    return probe
