"""Import cost: ``import hybridssm`` and ``hybridssm --help`` must not load ``torch._dynamo`` (seconds
of import time, paid by every user of the library); the compiler stack loads when a model is
compiled. A structural check, not a timing: the README gives the measured times."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return set(p.stdout.split())


def test_import_does_not_load_the_compiler_stack():
    loaded = _modules_after("import hybridssm")
    assert "hybridssm.ops.scan" in loaded  # the ops (and their custom ops) are registered at import
    assert "torch._dynamo" not in loaded
    assert "torch.utils.cpp_extension" not in loaded  # loaded when a kernel is built or loaded


def test_cli_help_does_not_load_the_compiler_stack():
    code = (
        "from hybridssm.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert "torch._dynamo" not in _modules_after(code)
