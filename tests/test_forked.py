"""tests/forked.py, the fork server that starts the suite's fresh processes: a run sees Ctrl-C as a
process started from a terminal does, and a run a test leaves behind is ended."""

from __future__ import annotations

import os

import forked


def test_a_run_gets_pythons_sigint_handler(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import signal\nprint(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n")
    run = forked.start(script, env=dict(os.environ))
    out, err = run.communicate(60)
    assert run.returncode == 0, err
    assert out.strip() == "True"


def test_runs_left_running_are_ended(tmp_path):
    forked.end_leftovers()  # nothing from earlier tests
    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(600)\n")
    done = tmp_path / "done.py"
    done.write_text("")
    finished = forked.start(done, env=dict(os.environ))
    finished.wait(60)
    left = forked.start(script, env=dict(os.environ))
    assert left.running()
    assert forked.end_leftovers() == [left.name]
    assert not left.running() and left.returncode < 0  # killed
    assert forked.end_leftovers() == []
