"""Training loop: exact resume, atomic checkpoints, checkpoint errors, schedule, parameter groups."""

from __future__ import annotations

import json

import pytest
import torch

from hybridssm.training import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    CheckpointError,
    TrainConfig,
    build_task_model,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
    train,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread avoids OpenMP oversubscription on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> TrainConfig:
    base = dict(
        model="gated_ssm",
        model_options=dict(hidden_size=16, num_layers=2, dropout=0.1),  # dropout: RNG is restored
        task="mqar",
        task_options=dict(vocab_size=16, seq_len=16, num_kv_pairs=2),
        steps=12, batch_size=8, eval_every=4, eval_size=16, log_every=3, warmup_steps=3,
        checkpoint_every=5, progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def params(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_is_bitwise_identical(tmp_path):
    cfg = tiny()
    full = train(cfg, out=tmp_path / "a")
    train(cfg, out=tmp_path / "b", stop_after=7)  # "interrupted" after step 7 (checkpoint there)
    # An interrupted run may have logged past its last checkpoint: resume must drop that.
    part = (tmp_path / "b" / METRICS_FILE).read_text()
    assert json.loads(part.splitlines()[-1])["step"] <= 7
    resumed = train(cfg, out=tmp_path / "b", resume=True)
    a, b = params(full.model), params(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "a" / METRICS_FILE).read_text() == (tmp_path / "b" / METRICS_FILE).read_text()
    assert full.history == resumed.history
    assert resumed.final["step"] == 12 and 0 <= resumed.final["test_acc"] <= 1


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    cfg = tiny(checkpoint_every=4, log_every=1, eval_every=100)
    train(cfg, out=tmp_path, stop_after=4)
    with (tmp_path / METRICS_FILE).open("a") as fh:  # a crash after logging step 5
        fh.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    res = train(cfg, out=tmp_path, resume=True, stop_after=6)
    steps = [r["step"] for r in res.history]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert res.history[4]["loss"] != 1.0


def test_crash_during_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    cfg = tiny()
    train(cfg, out=tmp_path, stop_after=5)
    path = tmp_path / CHECKPOINT_FILE
    before = path.read_bytes()
    model, _ = build_task_model(cfg)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def crashing_save(obj, fh, *a, **k):
        fh.write(b"partial garbage")
        raise KeyboardInterrupt  # the process dies mid-write

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, step=99, config=cfg, model=model, optimizer=opt, scheduler=sched,
                        device=torch.device("cpu"), log_sums=torch.zeros(3))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_FILE, METRICS_FILE, "run.json"])
    assert load_checkpoint(path, cfg)["step"] == 5


def test_corrupt_checkpoint_is_a_clear_error_and_touches_nothing(tmp_path):
    cfg = tiny()
    train(cfg, out=tmp_path, stop_after=5)
    path, metrics = tmp_path / CHECKPOINT_FILE, tmp_path / METRICS_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated: a torn copy
    metrics_before = metrics.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt"):
        train(cfg, out=tmp_path, resume=True)
    assert path.read_bytes() == data[: len(data) // 2] and metrics.read_bytes() == metrics_before
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(cfg, out=tmp_path, resume=True)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    train(tiny(), out=tmp_path, stop_after=5)
    metrics_before = (tmp_path / METRICS_FILE).read_bytes()
    ckpt_before = (tmp_path / CHECKPOINT_FILE).read_bytes()
    other = tiny(model_options=dict(hidden_size=24, num_layers=2, dropout=0.1))
    with pytest.raises(CheckpointError, match="model_options"):
        train(other, out=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="lr"):
        train(tiny(lr=1e-2), out=tmp_path, resume=True)
    assert (tmp_path / METRICS_FILE).read_bytes() == metrics_before
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == ckpt_before
    with pytest.raises(ValueError, match="resume"):  # a fresh run never overwrites a checkpoint
        train(tiny(), out=tmp_path)


def test_lr_schedule_warmup_then_cosine():
    cfg = tiny(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_param_groups_exclude_marked_norms_and_biases():
    from hybridssm.layers import is_fp32_no_decay

    model, _ = build_task_model(tiny())
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in no_decay["params"]}
    for name, p in model.named_parameters():
        expect = is_fp32_no_decay(p) or name.endswith("bias")
        assert (id(p) in ids) == expect, name
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bf16_autocast_runs():
    res = train(tiny(bf16=True, steps=3, eval_every=3, model_options=dict(hidden_size=16, num_layers=1)))
    assert res.final["step"] == 3 and res.final["test_loss"] == res.final["test_loss"]  # finite, not NaN


def test_bad_training_options():
    with pytest.raises(ValueError, match="'steps'"):
        tiny(steps=0)
    with pytest.raises(ValueError, match="'lr'"):
        tiny(lr=-1.0)


def test_run_length_defaults_scale_with_steps():
    """warm-up and evaluation period default to a tenth of the run, in Python as on the command line
    (a 20-step run was all warm-up and evaluated once with the old fixed 50 and 100)."""
    for steps, warmup, every in ((20, 2, 2), (5, 0, 1), (5000, 100, 500)):
        cfg = TrainConfig(model="gated_ssm", steps=steps)
        assert (cfg.warmup_steps, cfg.eval_every) == (warmup, every)
        assert cfg.identity()["warmup_steps"] == warmup  # a resume compares the resolved values
    cfg = TrainConfig(model="gated_ssm", steps=20, warmup_steps=7, eval_every=3)
    assert (cfg.warmup_steps, cfg.eval_every) == (7, 3)
    for name in ("eval_every", "warmup_steps"):
        with pytest.raises(ValueError, match=name):
            TrainConfig(model="gated_ssm", **{name: -1})
    with pytest.raises(ValueError, match="'steps'"):
        TrainConfig(model="gated_ssm", steps=0)
