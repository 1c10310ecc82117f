"""Smoke test of benchmarks/bench_mamba.py on tiny sizes (``--quick``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_mamba.py"


@pytest.mark.slow
def test_bench_mamba_quick(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_mamba", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_mamba", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.md"
    text = bench.main(["--quick", "--hidden", "16", "--budget", "0.05", "--threads", "1", "--no-memory",
                       "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    for row in ("hybridssm mamba", "transformers Mamba (sequential)", "TransformerEncoder (baseline)"):
        assert row in text
    assert "hybridssm mamba step (inplace)" in text and "GFLOP/s" in text
