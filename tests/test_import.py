"""Import cost: ``import hybridssm`` and ``hybridssm --help`` must not load ``torch._dynamo`` (seconds
of import time, paid by every user of the library); the compiler stack loads when a model is
compiled. A structural check, not a timing: the README gives the measured times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# One fresh interpreter (an interpreter start with torch costs ~3 s) notes the loaded modules after
# `import hybridssm`, then after `hybridssm --help`; the help's own output goes to stderr.
PROBE = """
import contextlib, json, sys
import hybridssm
after_import = sorted(sys.modules)
from hybridssm.cli import main
with contextlib.redirect_stdout(sys.stderr):
    try:
        main(['--help'])
    except SystemExit:
        pass
print(json.dumps({"import": after_import, "help": sorted(sys.modules)}))
"""


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[str]]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return {k: set(v) for k, v in json.loads(p.stdout).items()}


def test_import_does_not_load_the_compiler_stack(loaded):
    assert "hybridssm.ops.scan" in loaded["import"]  # the ops (and their custom ops) are registered at import
    assert "torch._dynamo" not in loaded["import"]
    assert "torch.utils.cpp_extension" not in loaded["import"]  # loaded when a kernel is built or loaded


def test_cli_help_does_not_load_the_compiler_stack(loaded):
    assert "hybridssm.cli" in loaded["help"]  # the help ran in this process
    assert "torch._dynamo" not in loaded["help"]
