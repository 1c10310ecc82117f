"""The ``hybridssm`` command, in process (``cli.main([...])``) and once through the installed script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import torch

import hybridssm as hs
from hybridssm import cli

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY_TASK = ["--task-opt", "vocab_size=16", "--task-opt", "seq_len=16", "--task-opt", "num_kv_pairs=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in hs.list_models():
        assert name in out
    for name in ("mqar", "selective_copy", "parity", "backbones"):
        assert name in out


def test_info_reports_options_params_and_state(capsys):
    code, out, _ = run(capsys, "info", "gated_ssm", "--hidden-size", "32", "--opt", "num_layers=3")
    assert code == 0
    assert "--hidden-size" in out and "--state-size" in out and "default 256" in out
    n = hs.param_count("gated_ssm", embed_dim=32, hidden_size=32, num_layers=3)
    assert f"parameters: {n:,}" in out
    model = hs.build("gated_ssm", embed_dim=32, hidden_size=32, num_layers=3)
    from torch.utils import _pytree as pytree

    nbytes = sum(t.numel() * t.element_size() for t in pytree.tree_leaves(model.init_state(1)))
    assert f"state at batch 1: {nbytes:,} bytes" in out


def test_option_spellings_agree(capsys):
    outs = [run(capsys, "info", "gated_ssm", *a)[1] for a in (
        ["--hidden-size", "48"], ["--hidden-size=48"], ["--opt", "hidden_size=48"])]
    assert outs[0] == outs[1] == outs[2]


def test_optional_bool_options_take_flags():
    """``bool | None`` options (ss_transformer's fusion_norm) read --name, --no-name and values."""
    parse = cli.parse_model_options
    assert parse("ss_transformer", ["--fusion-norm"], [], []) == {"fusion_norm": True}
    assert parse("ss_transformer", ["--no-fusion-norm"], [], []) == {"fusion_norm": False}
    assert parse("ss_transformer", ["--fusion-norm", "none"], [], []) == {"fusion_norm": None}
    assert parse("ss_transformer", ["--fusion-norm=off"], [], []) == {"fusion_norm": False}


@pytest.mark.parametrize("argv, message", [
    (["info", "gated_sm"], "did you mean 'gated_ssm'"),
    (["info", "gated_ssm", "--hiden-size", "4"], "did you mean '--hidden-size'"),
    (["info", "gated_ssm", "--hidden-size", "-3"], "'hidden_size' must be a positive integer"),
    (["info", "gated_ssm", "--dropout", "lots"], "'dropout'"),
    (["train", "gated_ssm", "--stepz", "3"], "did you mean '--steps'"),
    (["train", "gated_ssm", "--task", "mqr"], "did you mean 'mqar'"),
    (["train", "gated_ssm", "--task-opt", "num_kv=2"], "did you mean 'num_kv_pairs'"),
    (["train", "gated_ssm", "--steps", "0"], "'steps' must be a positive integer"),
    (["demo", "--models", "nope"], "unknown zoo entry"),
    (["trian", "gated_ssm"], "unknown command 'trian' (did you mean 'train'?); commands: list, info, train"),
    (["demo", "--models", "mamba,hymbaa"], "unknown zoo entry 'hymbaa' (did you mean 'hymba'?)"),
    (["info", "gated_ssm", "stray"], "unexpected argument"),
    (["--import", "no_such_module_xyz", "list"], "no_such_module_xyz"),
])
def test_bad_input_is_a_clean_error(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_parse_value_follows_field_types():
    @dataclass
    class C:
        n: int = 1
        x: float = 0.5
        flag: bool = True
        name: str = "a"
        maybe: int | None = None
        pattern: tuple = ()
        extra: dict | None = None

    f = {x.name: x for x in fields(C)}
    assert cli.parse_value("64", f["n"]) == 64
    assert cli.parse_value("1e-3", f["x"]) == 1e-3
    assert cli.parse_value("false", f["flag"]) is False and cli.parse_value("on", f["flag"]) is True
    assert cli.parse_value("123", f["name"]) == "123"
    assert cli.parse_value("none", f["maybe"]) is None
    assert cli.parse_value("[0, 3]", f["pattern"]) == (0, 3)
    assert cli.parse_value('{"num_heads": 2}', f["extra"]) == {"num_heads": 2}
    assert cli.parse_value("mamba", f["n"]) == "mamba"  # left for the config to reject by name


def test_train_then_resume(capsys, tmp_path):
    base = ["--threads", "1", "train", "gated_ssm", "--hidden-size", "16", *TINY_TASK, "--steps", "4",
            "--batch-size", "4", "--eval-size", "8", "--eval-every", "2", "--no-progress"]
    code, out_full, _ = run(capsys, *base, "--out", str(tmp_path / "a"))
    assert code == 0
    assert (tmp_path / "a" / "checkpoint.pt").is_file() and (tmp_path / "a" / "metrics.jsonl").is_file()
    assert hs.load(tmp_path / "a" / "model").backbone.config.hidden_size == 16
    assert run(capsys, *base, "--out", str(tmp_path / "b"), "--stop-after", "3")[0] == 0
    code, out_resumed, _ = run(capsys, *base, "--out", str(tmp_path / "b"), "--resume")
    assert code == 0
    full, resumed = json.loads(out_full), json.loads(out_resumed)
    full.pop("train_tok_s"), resumed.pop("train_tok_s")
    assert full == resumed and full["step"] == 4
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == (tmp_path / "b" / "metrics.jsonl").read_text()
    # A different model on that directory is refused, cleanly.
    code, _, err = run(capsys, *base[:4], "--hidden-size", "24", *base[6:], "--out", str(tmp_path / "b"),
                       "--resume")
    assert code == 2 and "different run" in err


def test_bench(capsys, tmp_path):
    code, out, _ = run(capsys, "bench", "gated_ssm", "--hidden-size", "16", "--batch", "2", "--length", "8",
                       "--latency-steps", "5", "--max-time", "0.05", "--max-iters", "2", "--no-memory",
                       "--json", str(tmp_path / "b.json"))
    assert code == 0
    assert "nn.TransformerEncoder" in out and "threads 1" in out and "GEMM" in out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["gated_ssm", "nn.TransformerEncoder"]
    assert rows[0]["step_ms"] > 0 and rows[1]["ratio"] == 1.0 and rows[0]["fwd_bwd_tok_s"] > 0


@pytest.mark.slow  # a fresh interpreter importing torch: seconds on a loaded machine
def test_peak_memory_subprocess():
    from hybridssm.bench import peak_memory

    mib = peak_memory("gated_ssm", {"embed_dim": 16, "hidden_size": 16}, (2, 8), threads=1)
    assert mib is not None and mib >= 0


def test_baseline_is_the_design_transformer():
    from hybridssm.bench import baseline_for

    model = hs.build("gated_ssm", embed_dim=24, hidden_size=32, num_layers=3)
    base = baseline_for(model)
    layer = base.encoder.layers[0]
    assert len(base.encoder.layers) == 3 and isinstance(base.input_proj, torch.nn.Linear)
    assert layer.self_attn.num_heads == 4 and layer.linear1.out_features == 128 and layer.norm_first
    assert layer.self_attn.batch_first and layer.dropout.p == 0.0
    x = torch.randn(2, 5, 24)
    y = base(x)
    x2 = x.clone()
    x2[:, 3:] = 0  # causal: the first outputs ignore later inputs
    torch.testing.assert_close(base(x2)[:, :3], y[:, :3])


def test_demo_quick(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--quick", "--models", "gated_ssm", "--out", str(tmp_path),
                       "--no-progress")
    assert code == 0 and "| rank | model |" in out
    payload = json.loads((tmp_path / "demo.json").read_text())
    assert [r["model"] for r in payload["results"]] == ["gated_ssm"]
    assert payload["results"][0]["curve"][-1][0] == payload["settings"]["steps"]
    md = (tmp_path / "demo.md").read_text()
    assert "Settings" in md and "What was observed" in md and "gated_ssm" in md
    assert (tmp_path / "demo.png").is_file() or "pip install hybridssm[plot]" in md


def test_demo_without_matplotlib(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, _ = run(capsys, "demo", "--quick", "--models", "gated_ssm", "--out", str(tmp_path),
                       "--no-progress")
    assert code == 0 and "pip install hybridssm[plot]" in out
    assert not (tmp_path / "demo.png").exists()
    assert (tmp_path / "demo.json").is_file()
    assert "pip install hybridssm[plot]" in (tmp_path / "demo.md").read_text()


def test_import_registers_a_custom_backbone(capsys, tmp_path, monkeypatch):
    from hybridssm import backbones

    (tmp_path / "my_backbone_plugin.py").write_text(
        "from hybridssm.backbones import register_backbone\n"
        "from hybridssm.mixers.gated_ssm import GatedSSMMixer\n"
        "def my_plugin_mixer(hidden_size, state_size=16):\n"
        "    return GatedSSMMixer(hidden_size, state_size=state_size)\n"
        "register_backbone('my_plugin_mixer', my_plugin_mixer)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code, out, _ = run(capsys, "--import", "my_backbone_plugin", "list")
        assert code == 0 and "my_plugin_mixer" in out
    finally:
        backbones._BACKBONES.pop("my_plugin_mixer", None)
        sys.modules.pop("my_backbone_plugin", None)


def test_import_finds_a_module_in_the_current_directory(capsys, tmp_path, monkeypatch):
    """The installed script's sys.path lacks the current directory (`python -m` has it): a user's
    `hybridssm --import my_plugin ...` beside my_plugin.py failed with "No module named"."""
    from hybridssm import backbones

    (tmp_path / "my_cwd_plugin.py").write_text(
        "from hybridssm.backbones import register_backbone\n"
        "from hybridssm.mixers.gated_ssm import GatedSSMMixer\n"
        "register_backbone('my_cwd_mixer', lambda hidden_size: GatedSSMMixer(hidden_size))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    try:
        code, out, _ = run(capsys, "--import", "my_cwd_plugin", "list")
        assert code == 0 and "my_cwd_mixer" in out
        assert sys.path[-1] == str(tmp_path)  # searched last: it shadows no installed module
        code, _, err = run(capsys, "--import", "no_such_plugin_module", "list")
        assert code == 2 and "No module named 'no_such_plugin_module'" in err
        assert "current directory" in err
    finally:
        backbones._BACKBONES.pop("my_cwd_mixer", None)
        sys.modules.pop("my_cwd_plugin", None)


def test_installed_entry_point():
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("hybridssm")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "hybridssm"]
    proc = subprocess.run([*cmd, "info", "gated_sm"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "did you mean 'gated_ssm'" in proc.stderr and "Traceback" not in proc.stderr


def test_python_dash_m(capsys, monkeypatch):
    import runpy

    monkeypatch.setattr(sys, "argv", ["hybridssm", "list"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("hybridssm", run_name="__main__")
    assert exc.value.code == 0 and "gated_ssm" in capsys.readouterr().out


def test_train_faults_are_one_line_errors(capsys, tmp_path, monkeypatch):
    import errno

    base = ["train", "gated_ssm", "--hidden-size", "16", "--num-layers", "1", *TINY_TASK, "--steps", "4",
            "--batch-size", "4", "--eval-size", "8", "--no-progress"]
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, *base, "--out", str(tmp_path / "file"))
    assert code == 2 and "is an existing file" in err and "Traceback" not in err
    code, _, err = run(capsys, *base, "--lr", "1e6", "--warmup-steps", "0", "--grad-clip", "0")
    assert code == 3 and "diverged" in err and "step" in err

    def full_disk(obj, fh, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = run(capsys, *base, "--out", str(tmp_path / "run"))
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) <= 2
