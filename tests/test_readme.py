"""Every ```python block of the README runs (in order, in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    namespace: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md block {i}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is what matters
            raise AssertionError(f"README python block {i} failed: {exc!r}\n{code}") from exc


def test_readme_quotes_the_tested_custom_backbone():
    example = (Path(__file__).parent / "custom_backbone.py").read_text().split("\n", 2)[2]
    assert example.strip() in README.read_text(), "README's custom backbone differs from the tested one"
