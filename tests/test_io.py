"""hybridssm.io: atomic writes (modes, fsync, failures), and load's checks of untrusted files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import forked
import hybridssm as hs
from hybridssm import io

TINY = dict(embed_dim=5, hidden_size=8, num_layers=2, state_size=4)


def run_python(folder: Path, code: str, *args: str, timeout: int = 300) -> tuple[int, str, str]:
    """``code`` run as a script in a fresh process (forked from one that imported torch, see
    tests/forked.py): its exit code, stdout and stderr."""
    script = folder / "script.py"
    script.write_text(textwrap.dedent(code))
    proc = forked.start(script, *args, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, err = proc.communicate(timeout)
    return proc.returncode, out, err


@pytest.fixture
def saved(tmp_path) -> Path:
    return hs.build("gated_ssm", **TINY).save_pretrained(tmp_path / "m")


def rewrite_config(path: Path, change) -> None:
    meta = json.loads((path / io.CONFIG_FILE).read_text())
    out = change(meta)  # a change returns the file's new text or bytes, or edits meta
    if isinstance(out, (str, bytes)):
        out = out.encode() if isinstance(out, str) else out
    else:
        out = json.dumps(meta).encode()
    (path / io.CONFIG_FILE).write_bytes(out)


# -- atomic writes --------------------------------------------------------------------------------
@contextlib.contextmanager
def _umask(mask: int):
    """The process's umask set to ``mask`` inside the block (tests run in one thread, so nothing
    else writes files meanwhile), the old one restored after."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umask_mode(tmp_path, umask):
    """Every kind of file the library writes (a saved model, a run's checkpoint, metrics, run.json,
    its model) gets ``0o666 & ~umask``, directories ``0o777 & ~umask``. In this process, under the
    umask set around the writes: a fresh interpreter per umask cost 10 s and checked nothing more,
    since the mode comes from the umask the kernel applies at each file's creation."""
    from hybridssm.training import TrainConfig, train

    cfg = TrainConfig(model="gated_ssm", model_options=dict(hidden_size=8, num_layers=1), task="mqar",
                      task_options=dict(vocab_size=16, seq_len=16, num_kv_pairs=2), steps=2,
                      batch_size=4, eval_every=2, eval_size=4, log_every=1, checkpoint_every=1,
                      progress=False)
    with _umask(umask):
        hs.build("gated_ssm", embed_dim=5, hidden_size=8, num_layers=1).save_pretrained(tmp_path / "model")
        train(cfg, out=tmp_path / "run")
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode for p in sorted(tmp_path.rglob("*"))}
    files = {p for p, m in modes.items() if stat.S_ISREG(m)}
    assert {"model/config.json", "model/model.safetensors", "run/checkpoint.pt",
            "run/metrics.jsonl"} <= files
    assert not [p for p in modes if p.endswith(io.TEMP_SUFFIX)]
    for p, mode in modes.items():
        want = (0o777 if stat.S_ISDIR(mode) else 0o666) & ~umask
        assert stat.S_IMODE(mode) == want, f"{p}: mode {stat.S_IMODE(mode):o}, want {want:o}"


def test_atomic_write_fsyncs_the_file_and_the_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    target = io.atomic_write(tmp_path / "a.txt", lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and synced == ["file", "dir"]


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def crash(tmp: Path) -> None:
        tmp.write_text("partial")
        raise KeyboardInterrupt  # the process is interrupted mid-write

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(target, crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]



def test_ctrl_c_during_a_torch_save_waits_for_the_file_then_interrupts(tmp_path):
    # SIGINT in the middle of torch.save's writes: without the hold-back the zip writer turns the
    # KeyboardInterrupt into "unexpected pos" and the file is lost; with it the file is complete
    # and the KeyboardInterrupt comes after.
    import signal

    target = tmp_path / "ckpt.pt"
    payload = {f"w{i}": torch.full((1000,), float(i)) for i in range(8)}

    class Interrupting:
        def __init__(self, fh):
            self.fh, self.writes = fh, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:
                os.kill(os.getpid(), signal.SIGINT)  # delivered between bytecodes, mid-save
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(payload, Interrupting(fh))

    # Python's own handler, as in a process started from a terminal (one started by a launcher that
    # ignores SIGINT, such as a non-interactive shell's background job, inherits "ignore"; there
    # atomic_write leaves the signal alone)
    launcher = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            io.atomic_write(target, write)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, launcher)
    got = torch.load(target, weights_only=True)
    assert got.keys() == payload.keys() and all(torch.equal(got[k], payload[k]) for k in payload)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


# -- load: eval mode --------------------------------------------------------------------------------
def test_loading_a_run_directory_points_to_its_model(tmp_path):
    """`hs.load("runs/x")` (the --out directory) said only that config.json is missing."""
    model_dir = tmp_path / "run" / "model"
    hs.build("gated_ssm", embed_dim=4, hidden_size=8, num_layers=1).save_pretrained(model_dir)
    with pytest.raises(FileNotFoundError, match=re.escape(f"(a training run: load {model_dir})")):
        hs.load(tmp_path / "run")
    with pytest.raises(FileNotFoundError) as info:
        hs.load(tmp_path / "elsewhere")
    assert "training run" not in str(info.value)


def test_load_returns_eval_mode_so_dropout_is_off(tmp_path):
    model = hs.build("gated_ssm", **TINY, dropout=0.5)  # training mode, dropout between blocks
    loaded = hs.load(model.save_pretrained(tmp_path / "m"))
    assert not any(m.training for m in loaded.modules())
    x = torch.randn(2, 6, 5)
    with torch.no_grad():
        a, b = loaded(x), loaded(x)
        assert torch.equal(a, b)
        assert torch.equal(a, model.eval()(x))


# -- load: corrupt or foreign config.json -----------------------------------------------------------
def _set(key, value):
    def change(meta):
        meta[key] = value
    return change


def _drop(key, section=None):
    def change(meta):
        del (meta[section] if section else meta)[key]
    return change


def _set_option(key, value):
    def change(meta):
        meta["config"][key] = value
    return change


def _nested(depth):
    def change(meta):
        meta["config"]["backbone_options"] = json.loads("[" * depth + "]" * depth)
    return change


CORRUPT_CONFIGS = {
    "not json": (lambda meta: "{not json", "not valid JSON"),
    "not utf-8": (lambda meta: b'{"model": "\xff"}', "not valid JSON"),
    "a list": (lambda meta: "[1, 2]", "top level, got a list"),
    "null": (lambda meta: "null", "top level, got null"),
    "very deep": (lambda meta: "[" * 100_000 + "]" * 100_000, "nested deeper"),
    "deep": (_nested(40), "nested deeper"),
    "no model": (_drop("model"), "missing key 'model'"),
    "version string": (_set("format_version", "1"), "'format_version' must be an integer"),
    "version bool": (_set("format_version", True), "'format_version' must be an integer"),
    "version newer": (_set("format_version", io.FORMAT_VERSION + 1), "newer.*upgrade hybridssm"),
    "version zero": (_set("format_version", 0), "unknown format_version 0"),
    "model number": (_set("model", 5), "'model' must be a model name"),
    "model unknown": (_set("model", "gated_sm"), "unknown model 'gated_sm'.*did you mean 'gated_ssm'"),
    "config list": (_set("config", [1]), "'config' must be a JSON object"),
    "dtype unknown": (_set("dtype", "int8"), "'dtype' must be one of"),
    "dtype number": (_set("dtype", 32), "'dtype' must be one of"),
    "option type": (_set_option("hidden_size", "8"), "'hidden_size' must be a positive integer"),
    "option float": (_set_option("hidden_size", 1e9), r"'hidden_size'.*1000000000\.0"),
    "option dict": (_set_option("embed_dim", {"a": 1}), "'embed_dim'"),
    "option unknown": (_set_option("hiden_size", 8), "did you mean 'hidden_size'"),
    "option missing": (_drop("embed_dim", "config"), "needs option.*'embed_dim'"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CONFIGS))
def test_corrupt_config_is_a_value_error_naming_the_file(saved, case):
    change, match = CORRUPT_CONFIGS[case]
    rewrite_config(saved, change)
    with pytest.raises(ValueError) as info:
        hs.load(saved)
    assert type(info.value) is ValueError  # not a JSONDecodeError, TypeError, RecursionError ...
    assert str(saved / io.CONFIG_FILE) in str(info.value)
    assert info.match(match)


def test_hybrid_config_with_a_wrong_backbone_type_is_a_value_error(tmp_path):
    model = hs.build("hybrid", **TINY, num_heads=2, head_dim=4, attention_every=2)
    path = model.save_pretrained(tmp_path / "h")
    for value in ({"x": 1}, ["mamba"], 3, "mamb"):
        rewrite_config(path, _set_option("backbone", value))
        with pytest.raises(ValueError, match=r"config.json: invalid options for model 'hybrid'.*backbone"):
            hs.load(path)


def test_oversized_config_is_refused_before_parsing(saved):
    (saved / io.CONFIG_FILE).write_text(" " * (io.MAX_CONFIG_BYTES + 1))
    with pytest.raises(ValueError, match="bytes"):
        hs.load(saved)


# -- load: weights that do not fit the config ------------------------------------------------------
def test_header_is_checked_before_any_weight_is_read(saved, monkeypatch):
    rewrite_config(saved, _set_option("hidden_size", 16))

    def no_read(*a, **k):
        raise AssertionError("weights were read before the shapes were checked")

    monkeypatch.setattr("safetensors.torch.load_file", no_read)
    with pytest.raises(ValueError) as info:
        hs.load(saved)
    assert info.match(r"model.safetensors does not match .*config.json")
    assert info.match(r"input_proj.weight: config wants shape \(16, 5\), file has \(8, 5\)")


def test_tensor_names_that_differ_are_listed(saved):
    w = saved / io.WEIGHTS_FILE
    tensors = load_file(w)
    tensors["extra.weight"] = torch.zeros(2)
    del tensors["final_norm.bias"]
    save_file(tensors, w)
    with pytest.raises(ValueError, match=r"missing weights \['final_norm.bias'\].*unexpected weights "
                                         r"\['extra.weight'\]"):
        hs.load(saved)


def test_more_layers_than_the_file_holds_fails_before_building(saved):
    rewrite_config(saved, _set_option("num_layers", 10**9))  # building it would take hours
    with pytest.raises(ValueError, match=r"missing weights of blocks 2\.\.999999999"):
        hs.load(saved)


# Weights are refused, not cast, when their dtype is not the recorded one: a cast would make the
# loaded model differ from the saved one (the round trip is bitwise), and a mismatch means the two
# files do not belong together. Cast after loading (model.to(dtype)) when that is what you want.
def test_dtype_mismatch_is_refused_not_cast(saved):
    rewrite_config(saved, _set("dtype", "float64"))
    with pytest.raises(ValueError, match=r"config wants dtype torch.float64, file has torch.float32"):
        hs.load(saved)
    rewrite_config(saved, _set("dtype", "float32"))
    w = saved / io.WEIGHTS_FILE
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(w).items()}, w)
    with pytest.raises(ValueError, match=r"config wants dtype torch.float32, file has torch.bfloat16"):
        hs.load(saved)


def test_marked_parameters_stay_fp32_in_a_bf16_file(tmp_path):
    model = hs.build("mamba", **TINY).to(torch.bfloat16)
    loaded = hs.load(model.save_pretrained(tmp_path / "m"))
    assert loaded.blocks[0].mixer.ssm.A_log.dtype == torch.float32
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), n


FAIL_FAST_SCRIPT = """
    import json, os, resource, sys, time
    import torch
    torch.set_num_threads(1)
    import hybridssm as hs
    from hybridssm import io
    path = sys.argv[1]
    meta = json.load(open(os.path.join(path, io.CONFIG_FILE)))
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    limit = vm + 256 * 2**20  # what is mapped now, plus 256 MiB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = {}
    for name, hidden in [("wide", 4096), ("huge", 10**9), ("absurd", 10**30)]:
        meta["config"]["hidden_size"] = hidden
        with open(os.path.join(path, io.CONFIG_FILE), "w") as f:
            json.dump(meta, f)
        t0 = time.perf_counter()
        try:
            hs.load(path)
            out[name] = ["loaded", 0.0]
        except Exception as exc:
            out[name] = [type(exc).__name__ + ": " + str(exc), time.perf_counter() - t0]
    print(json.dumps(out))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_a_wide_config_beside_small_weights_fails_fast_without_allocating(saved, tmp_path):
    # the 4096-wide model would need GBs, far beyond the 256 MiB address space the loader is allowed
    assert hs.param_count("gated_ssm", **{**TINY, "hidden_size": 4096}) * 4 > 4 * 256 * 2**20
    code, stdout, stderr = run_python(tmp_path, FAIL_FAST_SCRIPT, str(saved))
    assert code == 0, stderr
    out = json.loads(stdout.strip().splitlines()[-1])
    for name, (message, seconds) in out.items():
        assert message.startswith("ValueError: "), f"{name}: {message}"
        assert "config.json" in message and seconds < 1.0, f"{name}: {message} ({seconds:.2f} s)"
    assert "input_proj.weight: config wants shape (4096, 5), file has (8, 5)" in out["wide"][0]
    assert "1000000000" in out["huge"][0]  # a shape mismatch, or sizes that cannot even be built
    assert "cannot build 'gated_ssm'" in out["absurd"][0] and "\n" not in out["absurd"][0]
