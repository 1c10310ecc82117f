"""Fresh processes for tests that start many: each run is a new process forked from one server that
has imported torch, ``torch.utils.cpp_extension`` and ``torch._dynamo`` (which torch's optimizers
import on first use) and nothing else, so the run starts without hybridssm, any extension or any
cache in memory, as a new interpreter would, but skips the 3-6 s of those imports a new interpreter
pays (most of a short run's time).

``start(script, *args, env=...)`` runs ``script`` as ``__main__`` with ``sys.argv = [script, *args]``
and ``os.environ = env``; ``start_module(name, *args, env=..., logs=folder)`` runs ``python -m name``.
Their stdout and stderr go to files (beside the script, or in ``logs``), readable while they run. The
server is ``multiprocessing``'s fork server, started on first use (this module imports nothing of
hybridssm: the children unpickle it before they run the script)."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.utils.cpp_extension", "torch._dynamo"])
_COUNT = itertools.count()
_STARTED: list[Run] = []  # every run started since the last end_leftovers()


def _run(target: str, module: bool, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    """In the forked child: stdout and stderr to the files (at the descriptors, so that C code and
    subprocesses write there too), the run's environment, then the script as ``__main__``."""
    import runpy
    import signal
    import sys

    # Ctrl-C as in a process started from a terminal: Python's handler. A launcher that ignores SIGINT
    # (a non-interactive shell's background job) passes "ignore" on to every process it starts, this
    # server included, and a SIGINT test would then wait for a process that never stops.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for fd, path in ((1, out), (2, err)):
        log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, fd)
        os.close(log)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [target, *args]
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")


class Run:
    """A started script: ``name``, ``pid``, ``stdout()``/``stderr()`` so far, ``wait``, ``kill``,
    ``returncode`` (negative: the signal that ended it), ``communicate`` (wait, then both outputs)."""

    def __init__(self, target: str, module: bool, args: tuple[str, ...], env: dict[str, str],
                 logs: Path) -> None:
        self.name = name = f"{Path(target).stem}.{next(_COUNT)}"  # its log files' stem
        self._out, self._err = logs / f"{name}.out", logs / f"{name}.err"
        self._proc = _CTX.Process(target=_run, args=(target, module, list(args), dict(env), str(self._out),
                                                     str(self._err)))
        self._proc.start()
        self.pid = self._proc.pid
        _STARTED.append(self)

    def stdout(self) -> str:
        return self._out.read_text() if self._out.exists() else ""

    def stderr(self) -> str:
        return self._err.read_text() if self._err.exists() else ""

    def running(self) -> bool:
        return self._proc.is_alive()

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise TimeoutError(f"{self.name} still running after {timeout} s")
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return self.stdout(), self.stderr()

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Return once ``text`` is on stderr; fail if the run ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr():
                return
            if not self.running():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} on stderr: {self.stderr()!r}")


def start(script: Path, *args: str, env: dict[str, str]) -> Run:
    """Run ``script`` in a fresh process forked from the torch-importing server."""
    return Run(str(script), False, args, env, Path(script).parent)


def start_module(name: str, *args: str, env: dict[str, str], logs: Path) -> Run:
    """``python -m name *args`` in a fresh process forked from the torch-importing server."""
    return Run(name, True, args, env, Path(logs))


def end_leftovers() -> list[str]:
    """Kill every run started since the last call that is still running (a test that failed before
    it waited for its run, e.g. a training of 100,000 steps that never got its SIGINT) and wait for
    them; returns their names. tests/conftest.py calls it after each test that imported this module."""
    left = [run for run in _STARTED if run.running()]
    for run in left:
        run.kill()
        run.wait(30)
    _STARTED.clear()
    return [run.name for run in left]
