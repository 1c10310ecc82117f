"""Faults of a training run: torn metrics, divergence, full disks, leftovers of killed runs, DDP
timeouts. Each test reproduces the fault first."""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os

import pytest
import torch

import hybridssm.training.files as run_files
import hybridssm.training.loop as loop
from hybridssm.training import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    CheckpointError,
    DivergenceError,
    RunFileError,
    TrainConfig,
    load_checkpoint,
    read_metrics,
    train,
)


def tiny(**kw) -> TrainConfig:
    base = dict(
        model="gated_ssm", model_options=dict(hidden_size=16, num_layers=1),
        task="mqar", task_options=dict(vocab_size=16, seq_len=16, num_kv_pairs=2),
        steps=8, batch_size=4, eval_every=4, eval_size=8, log_every=2, warmup_steps=1,
        checkpoint_every=3, progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_a_torn_last_metrics_line_does_not_block_resume(tmp_path):
    cfg = tiny()
    full = train(cfg, out=tmp_path / "a")
    train(cfg, out=tmp_path / "b", stop_after=6)
    metrics = tmp_path / "b" / METRICS_FILE
    with metrics.open("a") as fh:  # a full disk cut the next append in half
        fh.write(json.dumps({"step": 8, "loss": 1.25, "acc": 0.5})[:17])
    resumed = train(cfg, out=tmp_path / "b", resume=True)
    assert resumed.history == full.history
    assert metrics.read_text() == (tmp_path / "a" / METRICS_FILE).read_text()


def test_resume_truncates_metrics_to_the_checkpoint_step(tmp_path):
    cfg = tiny(log_every=1)
    train(cfg, out=tmp_path, stop_after=3)
    with (tmp_path / METRICS_FILE).open("a") as fh:  # logged after the checkpoint, then killed
        fh.write(json.dumps({"step": 4, "loss": 9.0}) + "\n" + '{"step": 5, "lo')
    train(cfg, out=tmp_path, resume=True, stop_after=3)  # nothing to run: only reconciles
    assert [r["step"] for r in read_metrics(tmp_path / METRICS_FILE)] == [1, 2, 3]
    assert (tmp_path / METRICS_FILE).read_text().endswith("}\n")


def test_a_bad_line_inside_the_metrics_is_named(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


@pytest.mark.parametrize("line", ['[1, 2]', '{"loss": 1.0}', '{"step": "3"}'])
def test_a_metrics_line_edited_into_a_non_record_is_named(tmp_path, line):
    """A valid JSON line that is not a record (no integer step) gave a KeyError/TypeError traceback
    at resume (and in plot)."""
    cfg = tiny(log_every=1)
    train(cfg, out=tmp_path, stop_after=2)
    with (tmp_path / METRICS_FILE).open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(CheckpointError, match="line 3 is not a metrics record"):
        train(cfg, out=tmp_path, resume=True)


def test_divergence_stops_with_the_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    cfg = tiny(lr=1e6, warmup_steps=0, checkpoint_every=1, grad_clip=0.0, steps=20)
    with pytest.raises(DivergenceError, match=r"step \d+") as info:
        train(cfg, out=tmp_path)
    step = info.value.step
    assert 1 <= step < 20
    if (tmp_path / CHECKPOINT_FILE).exists():
        ckpt = load_checkpoint(tmp_path / CHECKPOINT_FILE, cfg)
        assert ckpt["step"] < step
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_non_finite_steps_are_skipped_up_to_max_nonfinite(tmp_path, monkeypatch, caplog):
    real = loop._loss_terms
    calls = {"n": 0}

    def nan_on_step_3(logits, targets):
        calls["n"] += 1
        loss, correct = real(logits, targets)
        return (loss * float("nan") if calls["n"] == 3 else loss), correct

    monkeypatch.setattr(loop, "_loss_terms", nan_on_step_3)
    with caplog.at_level(logging.WARNING, logger="hybridssm"):
        res = train(tiny(max_nonfinite=1, eval_every=100))
    assert res.skipped_steps == 1 and "step 3" in caplog.text
    assert all(torch.isfinite(p).all() for p in res.model.parameters())
    assert all(r["loss"] == r["loss"] for r in res.history)  # the skipped loss is not averaged in
    calls["n"] = 0
    with pytest.raises(DivergenceError, match="step 3") as info:
        train(tiny(max_nonfinite=0, eval_every=100))
    assert info.value.step == 3


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . "
                                                "unexpected pos 4608 vs 4496")])
def test_a_full_disk_during_a_checkpoint_is_one_clear_error(tmp_path, monkeypatch, error):
    def full_disk(obj, fh, *a, **k):
        fh.write(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunFileError) as info:
        train(tiny(), out=tmp_path)
    message = str(info.value)
    assert CHECKPOINT_FILE in message and "MiB free" in message and "\n" not in message
    assert not list(tmp_path.glob(".*.tmp"))  # the torn temporary file is gone


def test_a_full_disk_while_appending_metrics_is_a_run_file_error(tmp_path, monkeypatch):
    def full_disk(path, record):
        with run_files._writing(path):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop, "_append_metrics", full_disk)
    with pytest.raises(RunFileError, match="No space left on device"):
        train(tiny(), out=tmp_path)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_or_forbidden_output_names_no_free_space(tmp_path, code):
    """A read-only disk said "76,149 MiB free on that disk", as if space were the problem."""
    with pytest.raises(RunFileError) as info:
        with run_files._writing(tmp_path / METRICS_FILE):
            raise OSError(code, os.strerror(code))
    assert str(info.value).endswith(f"cannot write {tmp_path / METRICS_FILE}: {os.strerror(code)}")


def test_out_naming_a_file_is_a_clear_error(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        train(tiny(), out=target)


def test_orphaned_temporary_files_are_removed_at_the_next_start(tmp_path):
    cfg = tiny()
    train(cfg, out=tmp_path, stop_after=3)
    orphans = [tmp_path / f".{CHECKPOINT_FILE}.abc123.tmp", tmp_path / f".{METRICS_FILE}.x.tmp"]
    for p in orphans:
        p.write_bytes(b"\0" * 1000)  # what kill -9 inside a write leaves
    mine = tmp_path / "notes.tmp"
    mine.write_text("not ours")
    train(cfg, out=tmp_path, resume=True, stop_after=4)
    assert not any(p.exists() for p in orphans) and mine.exists()


def test_resume_without_a_checkpoint_starts_the_run(tmp_path, caplog):
    cfg = tiny(steps=3)
    with caplog.at_level(logging.INFO, logger="hybridssm"):
        res = train(cfg, out=tmp_path / "new", resume=True)
    assert "starting the run from step 0" in caplog.text
    assert res.final["step"] == 3 and (tmp_path / "new" / CHECKPOINT_FILE).is_file()
    assert res.history == train(cfg).history


def test_ddp_timeout_reaches_init_process_group(monkeypatch):
    seen = {}

    def fake_init(backend, **kw):
        seen.update(backend=backend, **kw)
        raise RuntimeError("stop here")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(loop.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(loop.dist, "init_process_group", fake_init)
    with pytest.raises(RuntimeError, match="stop here"):
        train(tiny(ddp_timeout=2.5, device="cpu"))
    assert seen["timeout"] == datetime.timedelta(minutes=2.5) and seen["backend"] == "gloo"
    assert TrainConfig(model="mamba").ddp_timeout == 10.0  # minutes, not torch's 30
    with pytest.raises(ValueError, match="ddp_timeout"):
        tiny(ddp_timeout=0)


def test_resuming_a_finished_run_reports_no_throughput(tmp_path):
    cfg = tiny(steps=3)
    train(cfg, out=tmp_path)
    res = train(cfg, out=tmp_path, resume=True)
    assert res.train_tokens_per_s is None and res.final["step"] == 3
