"""Training on your own arrays (``--data FILE``): formats, target kinds, lengths, splits, errors,
exact resume, and the command line."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import hybridssm as hs
from hybridssm import cli
from hybridssm.tasks import IGNORE, build_task
from hybridssm.training import TrainConfig, train

N, T, E = 20, 6, 3


def frames(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, T, E)).astype(np.float32)


def save(tmp_path, name: str = "d.npz", **arrays) -> str:
    path = tmp_path / name
    if name.endswith(".npz"):
        np.savez(path, **arrays)
    elif name.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    return str(path)


def config(path: str, **kw) -> TrainConfig:
    base = dict(model="gated_ssm", model_options=dict(hidden_size=16, num_layers=1), task="data",
                task_options=dict(path=path, val_fraction=0.25), steps=4, batch_size=4,
                eval_every=2, eval_size=64, log_every=1, warmup_steps=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
def test_every_format_reads_the_same_arrays(tmp_path, suffix):
    x, y = frames(), np.arange(N) % 3
    task = build_task("data", path=save(tmp_path, "d" + suffix, x=x, y=y))
    assert torch.equal(task.data.x, torch.from_numpy(x)) and torch.equal(task.data.y, torch.from_numpy(y))
    assert task.input_dim == E and task.num_outputs == 3 and task.chance == pytest.approx(1 / 3)


def test_kinds_of_targets(tmp_path):
    x = frames()
    lengths = np.array([T, 3] * (N // 2))
    cases = {
        "class_seq": (np.arange(N) % 2, IGNORE),
        "class_frame": (np.arange(N * T).reshape(N, T) % 4, IGNORE),
        "reg_seq": (np.ones((N, 2), np.float32), float("nan")),
        "reg_frame": (np.ones((N, T, 2), np.float32), float("nan")),
    }
    for kind, (y, _) in cases.items():
        task = build_task("data", path=save(tmp_path, f"{kind}.npz", x=x, y=y, lengths=lengths))
        assert task.data.kind == kind
        _, targets = task.batch(0, "test", 0, 64)
        rows = task.data.val_rows
        scored = targets.isfinite() if targets.is_floating_point() else targets != IGNORE
        if targets.dim() == 3:
            scored = scored.all(-1)
        for r, row in enumerate(rows.tolist()):
            n = int(lengths[row])
            expect = torch.zeros(T, dtype=torch.bool)
            if kind.endswith("seq"):
                expect[n - 1] = True  # one target per sequence, read at its last valid frame
            else:
                expect[:n] = True  # every valid frame, never the padding
            assert torch.equal(scored[r], expect), (kind, row)
    task = build_task("data", path=save(tmp_path, "next.npz", x=x, lengths=lengths))
    assert task.data.kind == "next_frame" and task.num_outputs == E and task.regression
    xb, targets = task.batch(0, "test", 0, 64)
    row = int(task.data.val_rows[0])
    n = int(lengths[row])
    torch.testing.assert_close(targets[0, : n - 1], torch.from_numpy(x[row, 1:n]))
    assert targets[0, n - 1 :].isnan().all()


def test_batches_are_a_function_of_seed_and_step_and_cover_each_epoch(tmp_path):
    task = build_task("data", path=save(tmp_path, x=frames(), y=np.arange(N) % 2), val_fraction=0.25)
    train_rows = set(task.data.train_rows.tolist())
    val_rows = set(task.data.val_rows.tolist())
    assert len(train_rows) == 15 and len(val_rows) == 5 and not train_rows & val_rows
    a, b = task.batch(3, "train", 2, 4), task.batch(3, "train", 2, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    x_of = {tuple(task.data.x[r].flatten().tolist()): r for r in range(N)}
    seen = [x_of[tuple(row.flatten().tolist())] for i in range(3) for row in task.batch(3, "train", i, 5)[0]]
    assert sorted(seen) == sorted(train_rows)  # the first epoch: every training row once
    assert not set(seen) & val_rows


def test_training_on_data_resumes_bitwise_and_saves_the_model(tmp_path):
    path = save(tmp_path, x=frames(), y=np.arange(N) % 3)
    full = train(config(path), out=tmp_path / "a")
    train(config(path), out=tmp_path / "b", stop_after=3)
    resumed = train(config(path), out=tmp_path / "b", resume=True)
    assert full.history == resumed.history and "test_acc" in full.final
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    loaded = hs.load(tmp_path / "a" / "model")
    x = torch.from_numpy(frames(1)[:2])
    full.model.eval()
    assert torch.equal(loaded(x), full.model(x)) and loaded(x).shape == (2, T, 3)


def test_resume_on_a_changed_data_file_is_refused(tmp_path):
    from hybridssm.training import CheckpointError

    path = save(tmp_path, x=frames(), y=np.arange(N) % 3)
    train(config(path), out=tmp_path / "run", stop_after=2)
    save(tmp_path, x=frames(seed=5), y=np.arange(N) % 3)  # regenerated under the same name
    with pytest.raises(CheckpointError, match="trained on other data"):
        train(config(path), out=tmp_path / "run", resume=True)


def test_regression_reports_loss_only(tmp_path):
    res = train(config(save(tmp_path, x=frames())))
    assert "test_acc" not in res.final and res.final["test_loss"] > 0
    assert all("acc" not in r for r in res.history)


@pytest.mark.parametrize("arrays, message", [
    (dict(y=np.zeros(N, np.int64)), "no array 'x'"),
    (dict(x=frames(), labels=np.zeros(N)), "unexpected array(s) 'labels'"),
    (dict(x=frames()[0]), "x must be float frames [N, T, E]"),
    (dict(x=np.zeros((N, T, E), np.int64)), "cast it"),
    (dict(x=frames(), y=np.zeros(N + 1, np.int64)), "must be [N] = [20]"),
    (dict(x=frames(), y=np.zeros((N, T + 1), np.int64)), "[N, T] = [20, 6]"),
    (dict(x=frames(), y=np.zeros((N, T + 1, 2), np.float32)), "[N, T, E'] = [20, 6, E']"),
    (dict(x=frames(), y=np.zeros(N, np.float32)), "use y[:, None]"),
    (dict(x=frames(), y=np.zeros(N, bool)), "got torch.bool"),
    (dict(x=frames(), y=-np.ones(N, np.int64)), "class labels must be >= 0, got -1 at row 0"),
    (dict(x=frames(), lengths=np.full(N, T + 1)), "lengths must be in 1..T = 1..6, got 7 at row 0"),
    (dict(x=frames(), lengths=np.ones(N, np.float32)), "lengths must be integers"),
])
def test_bad_arrays_are_named(tmp_path, arrays, message):
    with pytest.raises(ValueError) as info:
        build_task("data", path=save(tmp_path, **arrays))
    assert message in str(info.value)


def test_non_finite_values_are_located(tmp_path):
    x = frames()
    x[7, 2, 1] = np.nan
    with pytest.raises(ValueError, match=r"x has a non-finite value \(nan\) at row 7, frame 2, column 1"):
        build_task("data", path=save(tmp_path, x=x))
    y = np.zeros((N, 2), np.float32)
    y[4, 1] = np.inf
    with pytest.raises(ValueError, match=r"y has a non-finite value \(inf\) at row 4, column 1"):
        build_task("data", path=save(tmp_path, "y.npz", x=frames(), y=y))
    lengths = np.full(N, T)
    lengths[7] = 2  # NaN in the padding of row 7 is never read
    build_task("data", path=save(tmp_path, "pad.npz", x=x, lengths=lengths))


def test_no_pickle_ever_runs(tmp_path, capfd):
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="cannot be read"):
        build_task("data", path=str(tmp_path / "obj.npz"))

    class Boom:
        def __reduce__(self):
            return (print, ("pickle ran",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"x": Boom()}))
    with pytest.raises(ValueError, match="cannot be read"):
        build_task("data", path=str(tmp_path / "evil.pt"))
    assert "pickle ran" not in capfd.readouterr().out
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="dict of named tensors"):
        build_task("data", path=str(tmp_path / "list.pt"))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".pt"])
@pytest.mark.parametrize("content", [b"", b"PK\x03\x04garbage", b"\x10" + b"\0" * 7 + b'{"x":1}'])
def test_a_corrupt_file_is_named_not_a_traceback(tmp_path, suffix, content):
    """A corrupt .npz (BadZipFile) or .safetensors (SafetensorError) escaped as a traceback."""
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"data file {path} cannot be read as \\{suffix} arrays: "):
        build_task("data", path=str(path))


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="suffix must be one of"):
        build_task("data", path=str(tmp_path / "d.csv"))
    with pytest.raises(FileNotFoundError, match="not found"):
        build_task("data", path=str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="'val_fraction' must be a number in \\(0, 1\\)"):
        build_task("data", path=save(tmp_path, x=frames()), val_fraction=1.0)
    with pytest.raises(ValueError, match="'path'"):
        build_task("data")
    with pytest.raises(ValueError, match="'embed_dim' must be the data's feature size E = 3"):
        train(config(save(tmp_path, x=frames()), model_options=dict(hidden_size=16, embed_dim=5)))


def test_cli_data_and_val_fraction(capsys, tmp_path):
    path = save(tmp_path, x=frames(), y=np.arange(N) % 2)
    argv = ["train", "gated_ssm", "--hidden-size", "16", "--num-layers", "1", "--data", path,
            "--steps", "3", "--batch-size", "4", "--eval-every", "3", "--out", str(tmp_path / "run")]
    assert cli.main([*argv, "--val-fraction", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 3 and 0 <= out["test_acc"] <= 1
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["task_options"] == {"path": path, "val_fraction": 0.5}
    assert hs.load(tmp_path / "run" / "model").embedding is None  # frames go in as they are
    assert cli.main([*argv[:-2], "--task", "parity"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert cli.main([*argv[:-2], "--data", str(tmp_path / "nope.npz")]) == 2
    assert "not found" in capsys.readouterr().err


def _ddp_worker(rank: int, world: int, store: str, path: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        res = train(config(path), out=out)
        torch.save(res.model.state_dict(), f"{out}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch: ~45 s on a loaded 2-core machine
def test_two_process_ddp_on_data_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    from helpers import assert_close

    path = save(tmp_path, x=frames(), y=np.arange(N) % 3)
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), path, str(tmp_path / "run")), nprocs=2, join=True)
    r0, r1 = torch.load(f"{tmp_path / 'run'}.rank0.pt"), torch.load(f"{tmp_path / 'run'}.rank1.pt")
    single = train(config(path)).model.state_dict()
    for k, v in single.items():
        assert torch.equal(r0[k], r1[k]), k
        assert_close(r0[k], v, msg=k)
