"""Fresh processes for tests that start many: each run is a new process forked from one server that
has imported torch (and ``torch.utils.cpp_extension``) and nothing else, so the run starts without
hybridssm, any extension or any cache in memory, as a new interpreter would, but skips the ~3 s
``import torch`` a new interpreter pays (most of a short run's time).

``start(script, *args, env=...)`` runs ``script`` as ``__main__`` with ``sys.argv = [script, *args]``
and ``os.environ = env``; its stdout and stderr go to files beside the script, readable while it
runs. The server is ``multiprocessing``'s fork server, started on first use (this module imports
nothing of hybridssm: its children unpickle it before they run the script)."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.utils.cpp_extension"])
_COUNT = itertools.count()


def _run(script: str, args: list[str], env: dict[str, str], out: str, err: str) -> None:
    import runpy
    import sys

    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


class Run:
    """A started script: ``pid``, ``stdout()``/``stderr()`` so far, ``wait``, ``kill``, ``returncode``
    (negative: the signal that ended it), ``communicate`` (wait, then both outputs)."""

    def __init__(self, script: Path, args: tuple[str, ...], env: dict[str, str]) -> None:
        n = next(_COUNT)
        self._out = script.with_name(f"{script.stem}.{n}.out")
        self._err = script.with_name(f"{script.stem}.{n}.err")
        self._proc = _CTX.Process(target=_run, args=(str(script), list(args), dict(env), str(self._out),
                                                     str(self._err)))
        self._proc.start()
        self.pid = self._proc.pid

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
            raise TimeoutError(f"{self._out.stem} still running after {timeout} s")
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
    return Run(Path(script), args, env)
