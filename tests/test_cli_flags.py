"""One test per command-line flag added for users: help defaults, version, plain list, logging
levels, progress lines without a terminal, warnings, divergence, DDP timeout, plot."""

from __future__ import annotations

import json
import re

import pytest
import torch

import hybridssm as hs
from hybridssm import cli

TINY = ["train", "gated_ssm", "--hidden-size", "16", "--num-layers", "1", "--task-opt", "vocab_size=16",
        "--task-opt", "seq_len=16", "--task-opt", "num_kv_pairs=2", "--batch-size", "4", "--eval-size", "8"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["train", "bench", "plot", "info", "demo"])
def test_help_shows_every_option_default(capsys, command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)).choices[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.option_strings and action.nargs != 0 and action.default is not cli.argparse.SUPPRESS:
            assert "default" in formatter._get_help_string(action), action.option_strings
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and "(default: " in out
    if command == "train":
        text = " ".join(out.split())
        assert "optimizer steps (default: 1000)" in text and "(default: 10.0)" in text
        assert ("--eval-every EVAL_EVERY evaluate on the held-out set every N steps (default: steps / 10)"
                in text)
        assert "--threads THREADS torch CPU threads (default: torch's choice)" in text


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith(f"hybridssm {hs.__version__} (torch ")


def test_list_is_plain_text(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "``" not in out and ":class:" not in out and "seed" not in out.lower()
    assert re.search(r"^  mamba +A stack of Mamba-1", out, flags=re.M)


def test_info_looks_the_config_up_once_and_builds_once(capsys, monkeypatch):
    import hybridssm.registry as registry

    lookups, builds = [], []
    real_lookup, model_class = registry.get_config_class, registry.get_model_class("gated_ssm")
    monkeypatch.setattr(registry, "get_config_class", lambda name: lookups.append(name) or real_lookup(name))
    monkeypatch.setattr(model_class, "__init__", (lambda init: lambda self, *a, **k: (
        builds.append(1), init(self, *a, **k))[1])(model_class.__init__))
    code, out, _ = run(capsys, "info", "gated_ssm", "--hidden-size", "32")
    assert code == 0 and "parameters:" in out
    assert lookups == ["gated_ssm"] and builds == [1]


def test_quiet_keeps_only_warnings(capsys, tmp_path):
    code, out, err = run(capsys, "--quiet", *TINY, "--steps", "2", "--out", str(tmp_path))
    assert code == 0 and json.loads(out)["step"] == 2
    assert err == ""


def test_verbose_and_info_messages_go_through_logging(capsys, tmp_path, caplog):
    code, _, err = run(capsys, *TINY, "--steps", "2", "--out", str(tmp_path), "-v")
    assert code == 0 and "hybridssm: training gated_ssm" in err
    assert "hybridssm: debug: rank 0 of 1 on cpu; run settings:" in err
    code, _, err = run(capsys, *TINY, "--steps", "2", "--out", str(tmp_path / "b"))
    assert code == 0 and "debug:" not in err and "hybridssm: training gated_ssm" in err
    assert any(r.name.startswith("hybridssm") for r in caplog.records)
    code, _, err = run(capsys, "--quiet", "--verbose", "list")
    assert code == 2 and "exclude each other" in err


def test_train_without_out_warns_that_nothing_is_kept(capsys):
    code, _, err = run(capsys, *TINY, "--steps", "1")
    assert code == 0 and "warning: no --out directory: nothing will be kept" in err


def test_resuming_a_finished_run_prints_no_nan(capsys, tmp_path):
    assert run(capsys, *TINY, "--steps", "2", "--out", str(tmp_path))[0] == 0
    code, out, err = run(capsys, *TINY, "--steps", "2", "--out", str(tmp_path), "--resume")
    assert code == 0 and "NaN" not in out + err and "nan" not in out
    assert "already finished" in err and json.loads(out)["step"] == 2


def test_progress_every_logs_lines_without_a_terminal(capsys, tmp_path):
    # capsys' stderr is not a terminal: no bar, one line every N steps (and at the end)
    code, _, err = run(capsys, *TINY, "--steps", "5", "--progress-every", "2", "--out", str(tmp_path))
    assert code == 0
    steps = re.findall(r"hybridssm: step (\d+)/5 ", err)
    assert steps == ["2", "4", "5"] and "\r" not in err
    code, _, err = run(capsys, *TINY, "--steps", "2", "--progress-every", "0", "--out", str(tmp_path / "b"))
    assert code == 0 and "step 2/2" not in err


def test_max_nonfinite_and_divergence_exit_code(capsys, tmp_path):
    diverge = ["--lr", "1e6", "--warmup-steps", "0", "--grad-clip", "0", "--steps", "6"]
    code, _, err = run(capsys, *TINY, *diverge, "--out", str(tmp_path / "a"))
    assert code == 3 and re.search(r"diverged: .* at step \d+", err)
    code, _, err = run(capsys, *TINY, *diverge, "--max-nonfinite", "100", "--out", str(tmp_path / "b"))
    assert code in (0, 3) and "update skipped" in err


def test_ddp_timeout_reaches_the_training_config(capsys, monkeypatch):
    import hybridssm.training as training

    seen = {}

    def fake_train(config, **kw):
        seen["config"], seen["kw"] = config, kw
        raise ValueError("stop")

    monkeypatch.setattr(training, "train", fake_train)
    code, _, _ = run(capsys, *TINY, "--ddp-timeout", "3", "--max-nonfinite", "2", "--progress-every", "7")
    assert code == 2 and seen["config"].ddp_timeout == 3.0
    assert seen["config"].max_nonfinite == 2 and seen["config"].progress_every == 7
    code, _, err = run(capsys, *TINY, "--ddp-timeout", "0")
    assert code == 2 and "ddp_timeout" in err


def test_train_saves_the_whole_task_model(capsys, tmp_path):
    """model/ holds embedding + backbone + head: loaded, it gives the in-process outputs."""
    from hybridssm.training import TrainConfig, train

    cfg = TrainConfig(model="gated_ssm", model_options=dict(hidden_size=16, num_layers=1),
                      task_options=dict(vocab_size=16, seq_len=16, num_kv_pairs=2), steps=3,
                      batch_size=4, eval_size=8, eval_every=3, progress=False)
    res = train(cfg, out=tmp_path)
    loaded = hs.load(tmp_path / "model")
    tokens = torch.randint(0, 16, (2, 16))
    res.model.eval()
    assert torch.equal(loaded.eval()(tokens), res.model(tokens))
    assert type(loaded.backbone).__name__ == "GatedSSM" and loaded.backbone.config.hidden_size == 16
    loaded.backbone.save_pretrained(tmp_path / "backbone")  # the backbone alone, as documented
    assert hs.load(tmp_path / "backbone").config == res.model.backbone.config


def test_tensorboard_flag(capsys, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    code, _, _ = run(capsys, *TINY, "--steps", "2", "--out", str(tmp_path / "run"),
                     "--tensorboard", str(tmp_path / "tb"))
    assert code == 0 and list((tmp_path / "tb").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"loss", "acc", "test_loss", "test_acc"} <= set(events.Tags()["scalars"])


def test_tensorboard_missing_is_a_clear_error(capsys, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code, _, err = run(capsys, *TINY, "--steps", "2", "--tensorboard", str(tmp_path / "tb"))
    assert code == 2 and "pip install 'hybridssm[tensorboard]'" in err and "Traceback" not in err
    assert not (tmp_path / "tb").exists()


def test_plot_draws_finished_runs(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    for lr in ("3e-3", "1e-2"):
        assert run(capsys, *TINY, "--steps", "4", "--eval-every", "2", "--lr", lr,
                   "--out", str(tmp_path / f"lr{lr}"))[0] == 0
    code, _, err = run(capsys, "plot", str(tmp_path / "lr3e-3"), str(tmp_path / "lr1e-2"),
                       "-o", str(tmp_path / "c.png"))
    assert code == 0 and (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run(capsys, "plot", str(tmp_path))
    assert code == 2 and "is not a training run" in err


def test_plot_title_and_chance_line(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from hybridssm import plot
    from hybridssm.training import TrainConfig, train

    cfg = TrainConfig(model="gated_ssm", model_options=dict(hidden_size=16, num_layers=1),
                      task_options=dict(vocab_size=16, seq_len=16, num_kv_pairs=2), steps=2,
                      batch_size=4, eval_size=8, eval_every=1, progress=False)
    train(cfg, out=tmp_path)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot.plot_runs([tmp_path])
    fig = figures[0]
    assert "gated_ssm" in fig._suptitle.get_text() and "mqar" in fig._suptitle.get_text()
    test_ax = fig.axes[1]
    chance = [ln for ln in test_ax.get_lines() if ln.get_label().startswith("chance")]
    assert chance and chance[0].get_ydata()[0] == pytest.approx(1 / 8)  # 8 values in vocab 16
    assert (tmp_path / "curves.png").is_file()


def _cli_process(tmp_path, *argv: str):
    """``python -m hybridssm *argv`` in a fresh process (forked from one that imported torch, see
    tests/forked.py); its stdout and stderr are files."""
    import os

    import forked

    return forked.start_module("hybridssm", *argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, logs=tmp_path)


def test_progress_lines_in_a_real_process_without_a_terminal(tmp_path):
    """As under nohup or a batch system: stderr is a file, so no bar, only log lines."""
    proc = _cli_process(tmp_path, "--threads", "1", *TINY, "--steps", "4", "--progress-every", "2",
                        "--out", str(tmp_path / "run"))
    out, log_text = proc.communicate(timeout=300)
    assert proc.returncode == 0, log_text
    assert re.findall(r"^hybridssm: step (\d+)/4 ", log_text, flags=re.M) == ["2", "4"]
    assert "\r" not in log_text and "it/s" not in log_text  # no tqdm bar
    assert json.loads(out)["step"] == 4


def test_ctrl_c_is_one_line_that_says_how_to_resume(capsys, tmp_path, monkeypatch):
    import hybridssm.training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hybridssm.training, "train", interrupted)
    code, _, err = run(capsys, *TINY, "--steps", "4", "--out", str(tmp_path / "run"))
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"hybridssm: error: train: interrupted; {tmp_path / 'run'} "
                                           "keeps the last checkpoint: run the same command with "
                                           "--resume to continue")
    monkeypatch.setattr(cli, "cmd_list", interrupted)
    code, _, err = run(capsys, "list")
    assert code == 130 and err.strip() == "hybridssm: error: list: interrupted"
    with pytest.raises(KeyboardInterrupt):
        run(capsys, "--traceback", "list")


def test_ctrl_c_of_a_real_training_process_then_resume(tmp_path):
    """SIGINT (Ctrl-C) in the middle of training: exit 130 with one line, no traceback, and the
    run resumes from its checkpoint."""
    import signal
    import time

    out = tmp_path / "run"
    argv = ["--threads", "1", *TINY, "--steps", "100000", "--eval-every", "2", "--log-every", "1",
            "--save-every", "2", "--out", str(out)]
    proc = _cli_process(tmp_path, *argv)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").exists() and proc.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "--resume" in err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    done = _cli_process(tmp_path, *argv, "--resume", "--stop-after", str(step + 2))
    done_out, done_err = done.communicate(timeout=300)
    assert done.returncode == 0, done_err
    assert json.loads(done_out)["step"] == step + 2
    assert f"resuming from step {step}" in done_err


def test_train_defaults_are_the_python_defaults(capsys, monkeypatch):
    """`hybridssm train` and `TrainConfig` give the same run for the same settings (the README's
    Python example says which command it equals)."""
    import hybridssm.training as training

    seen = {}

    def fake_train(config, **kw):
        seen["config"] = config
        raise ValueError("stop")

    monkeypatch.setattr(training, "train", fake_train)
    run(capsys, "train", "gated_ssm", "--hidden-size", "32", "--num-layers", "1", "--data", "frames.npz",
        "--steps", "20", "--batch-size", "16", "--eval-every", "10", "--out", "run")
    python = training.TrainConfig(model="gated_ssm", model_options={"hidden_size": 32, "num_layers": 1},
                                  task="data", task_options={"path": "frames.npz", "val_fraction": 0.1},
                                  steps=20, batch_size=16, eval_every=10)
    assert seen["config"].identity() == python.identity()
    assert python.warmup_steps == 2
    code, _, err = run(capsys, *TINY, "--eval-every", "0")
    assert code == 2 and "'eval_every' must be a positive integer, got 0" in err


def _fake_run(path, *, task, chance, records, steps):
    path.mkdir()
    config = {"model": "gated_ssm", "model_options": {}, "task": task, "task_options": {}, "steps": steps,
              "batch_size": 8, "lr": 3e-3, "seed": 0}
    (path / "run.json").write_text(json.dumps({"config": config, "chance": chance, "regression": False}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plot_shows_one_point_runs_and_keeps_legends_off_the_curves(tmp_path, monkeypatch):
    """A run with one training record was an invisible line; the legends covered the curves; two
    chance lines could not be told apart."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from hybridssm import plot

    short = _fake_run(tmp_path / "short", task="data", chance=0.5, steps=10,
                      records=[{"step": 10, "loss": 0.8, "acc": 0.4, "test_loss": 0.6, "test_acc": 0.6}])
    long = _fake_run(tmp_path / "long", task="mqar", chance=0.125, steps=20,
                     records=[{"step": s, "loss": 3 - s / 10, "acc": 0.1, "test_loss": 2.9, "test_acc": 0.1}
                              for s in range(2, 21, 2)])
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot.plot_runs([short, long], tmp_path / "c.png")
    fig = figures[0]
    fig.canvas.draw()
    train_ax, test_ax = fig.axes
    one_point = next(ln for ln in train_ax.get_lines() if ln.get_label().startswith("short"))
    assert len(one_point.get_xdata()) == 1 and one_point.get_marker() not in ("", "None", None)
    renderer = fig.canvas.get_renderer()
    for ax in (train_ax, test_ax):
        legend = ax.get_legend().get_window_extent(renderer)
        assert legend.y1 < ax.get_window_extent(renderer).y0  # below the panel, not on it
    runs = {ln.get_label().split(" ")[0]: ln.get_color() for ln in test_ax.get_lines()
            if not ln.get_label().startswith("chance")}
    chance = {ln.get_label(): ln.get_color() for ln in test_ax.get_lines()
              if ln.get_label().startswith("chance")}
    assert chance == {"chance (0.5)": runs["short"], "chance (0.125)": runs["long"]}
    legend_box = test_ax.get_legend().get_window_extent(renderer)
    image_height = plt.imread(tmp_path / "c.png").shape[0]
    assert image_height >= (fig.bbox.y1 - legend_box.y0) * 0.99  # the saved PNG holds the legends


@pytest.mark.parametrize("edit", ["steps", "chance", "config", "record"])
def test_plot_of_run_files_edited_by_hand_is_a_one_line_error(capsys, tmp_path, edit):
    """A run.json or metrics.jsonl edited by hand gave a TypeError/KeyError traceback or a message
    from deep inside the plot ("type str doesn't define __round__")."""
    pytest.importorskip("matplotlib")
    path = _fake_run(tmp_path / "r", task="mqar", chance=0.125, steps=4,
                     records=[{"step": 2, "loss": 2.0, "test_acc": 0.1}])
    info = json.loads((path / "run.json").read_text())
    if edit == "steps":
        info["config"]["steps"] = "four"
    elif edit == "chance":
        info["chance"] = "1/8"
    elif edit == "config":
        info["config"] = [4]
    (path / "run.json").write_text(json.dumps(info))
    if edit == "record":
        with (path / "metrics.jsonl").open("a") as fh:
            fh.write('{"loss": 1.0}\n')
    code, _, err = run(capsys, "plot", str(path), "-o", str(tmp_path / "c.png"))
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    where = "metrics.jsonl line 2" if edit == "record" else "run.json is not a run description"
    assert where in err and not (tmp_path / "c.png").exists()
