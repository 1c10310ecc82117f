"""The fused-kernel build cache (ops/_cpu_ext.py), in fresh processes over a fresh
TORCH_EXTENSIONS_DIR: one build per torch install and source, concurrent first builds, a build killed
part-way, a wait that gives up, the one stderr line while building, the compiler log of a failed
build and the one fallback warning. A tiny extension (plain Python C API, compiles in a second or
two) stands in for the real kernels where the test is about the cache. Each run is a fresh process
forked from a server that has imported torch and nothing of hybridssm (tests/forked.py): these 19
runs would otherwise pay 3 s or more of ``import torch`` each."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

import forked
from hybridssm.ops import _cpu_ext

SRC = Path(__file__).resolve().parents[2] / "src"

TINY = r"""
#include <Python.h>
#define HS_STR(x) #x
#define HS_XSTR(x) HS_STR(x)
#define HS_CAT(a, b) a##b
#define HS_INIT(name) HS_CAT(PyInit_, name)
static struct PyModuleDef tiny_def = {
    PyModuleDef_HEAD_INIT, HS_XSTR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC HS_INIT(TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&tiny_def);
  PyModule_AddIntConstant(m, "answer", ANSWER);
  return m;
}
"""

# Loads the tiny extension through the library's cache. argv: torch version and C++ ABI to pretend
# (simulating another torch install), and a delay that stands for a slow compiler.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    import torch.utils.cpp_extension as cx
    from hybridssm.ops import _cpu_ext

    version, abi, delay = sys.argv[2], sys.argv[3], float(sys.argv[4])
    if version != "-":
        torch.__version__ = version
    if abi != "-":
        torch._C._GLIBCXX_USE_CXX11_ABI = abi == "1"
    if delay:
        real_load = cx.load
        def slow_load(*args, **kwargs):
            time.sleep(delay)
            return real_load(*args, **kwargs)
        cx.load = slow_load
    src = Path(sys.argv[1])
    ext = _cpu_ext.Extension("tiny", src / "tiny.cpp", src, ("-DANSWER=42",))
    try:
        print("answer", _cpu_ext.load(ext).answer, ext.name, flush=True)
    except _cpu_ext.KernelBuildError as exc:
        print("error", exc, flush=True)
        print("log", exc.log, flush=True)
    """
)


@pytest.fixture
def env(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny.cpp").write_text(TINY)
    (tmp_path / "run.py").write_text(SCRIPT)
    return {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(SRC),
            "OMP_NUM_THREADS": "1"}


def _start(tmp_path, env, version="-", abi="-", delay=0.0, extra_env=None):
    return forked.start(tmp_path / "run.py", str(tmp_path / "src"), version, abi, str(delay),
                        env={**env, **(extra_env or {})})


def _run(tmp_path, env, *args, timeout=240, **kwargs):
    p = _start(tmp_path, env, *args, **kwargs)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err
    return out, err


def _building(err: str) -> int:
    return err.count("hybridssm: building fused CPU kernels (first use, cached in ")


def test_builds_once_with_one_line_then_loads_from_the_cache(tmp_path, env):
    out, err = _run(tmp_path, env)
    assert out.startswith("answer 42")
    assert _building(err) == 1, err
    assert f"cached in {tmp_path / 'cache' / 'hybridssm'})" in err
    assert len(err.strip().splitlines()) == 1, err  # the one line, no compiler output
    out2, err2 = _run(tmp_path, env)
    assert out2 == out and err2 == ""
    leftovers = [p.name for p in (tmp_path / "cache" / "hybridssm").iterdir() if ".build-" in p.name]
    assert leftovers == []


def test_each_torch_install_keeps_its_own_build(tmp_path, env):
    # Two torch installs (version, C++ ABI) switch back and forth: each builds once, none reloads
    # the other's binary.
    names = set()
    for version, abi, builds in (("9.0.0", "1", 1), ("9.1.0", "1", 1), ("9.0.0", "0", 1), ("9.0.0", "1", 0)):
        out, err = _run(tmp_path, env, version, abi)
        assert _building(err) == builds, (version, abi, err)
        names.add(out.split()[2])
    assert len(names) == 3


def test_source_or_included_header_change_gives_a_new_build(tmp_path, env):
    out, _ = _run(tmp_path, env)
    src = tmp_path / "src"
    (src / "sub").mkdir()
    (src / "sub" / "extra.h").write_text("// a header the source does not include\n")
    out2, err2 = _run(tmp_path, env)
    assert _building(err2) == 0 and out2 == out  # a header nothing includes changes nothing
    (src / "tiny.cpp").write_text('#include "sub/extra.h"\n' + TINY)
    out3, err3 = _run(tmp_path, env)
    assert _building(err3) == 1 and out3.split()[2] != out.split()[2]
    (src / "sub" / "extra.h").write_text("// the included header, edited\n")
    out4, err4 = _run(tmp_path, env)
    assert _building(err4) == 1 and out4.split()[2] not in (out.split()[2], out3.split()[2])


def test_cache_key_follows_quoted_includes_transitively(tmp_path):
    (tmp_path / "step").mkdir()
    (tmp_path / "a.cpp").write_text('#include "step/b.h"\n#include <vector>\n#include "torch/extension.h"\n')
    (tmp_path / "step" / "b.h").write_text('#include "c.h"\n  #  include "../d.h"\n')
    (tmp_path / "step" / "c.h").write_text('#include "b.h"  // a cycle is followed once\n')
    (tmp_path / "d.h").write_text("// reached through ../ from step/\n")
    (tmp_path / "step" / "unused.h").write_text("// included by nothing\n")
    a = tmp_path / "a.cpp"
    assert [p.relative_to(tmp_path).as_posix() for p in _cpu_ext.included_files(a, tmp_path)] == [
        "a.cpp", "d.h", "step/b.h", "step/c.h"]
    key = _cpu_ext.cache_key(a, tmp_path, ["-O3"])
    (tmp_path / "step" / "unused.h").write_text("// edited\n")
    assert _cpu_ext.cache_key(a, tmp_path, ["-O3"]) == key
    assert _cpu_ext.cache_key(a, tmp_path, ["-O2"]) != key
    (tmp_path / "d.h").write_text("// edited\n")
    assert _cpu_ext.cache_key(a, tmp_path, ["-O3"]) != key


def test_each_kernel_hashes_only_its_own_headers():
    # the step kernel's headers are not part of the other kernels' builds (an edit there rebuilds one)
    step = {p.name for p in _cpu_ext.included_files(_cpu_ext.CSRC / "step.cpp", _cpu_ext.CSRC)}
    scan = {p.name for p in _cpu_ext.included_files(_cpu_ext.CSRC / "selective_scan.cpp", _cpu_ext.CSRC)}
    assert {"step.cpp", "plan.h", "common.h", "gemm_rows.h", "vec_helpers.h"} <= step
    assert scan == {"selective_scan.cpp", "checks.h", "vec_helpers.h"}


def test_concurrent_first_builds_both_succeed(tmp_path, env):
    procs = [_start(tmp_path, env, delay=5.0) for _ in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out.startswith("answer 42"), err
    assert sum(_building(err) for _, err in results) == 1  # one built, the other waited and loaded


def test_a_build_killed_part_way_is_retried_by_the_next_process(tmp_path, env):
    victim = _start(tmp_path, env, delay=600)
    victim.wait_for("building fused CPU kernels")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    lock = next((tmp_path / "cache" / "hybridssm").glob("*.lock"))
    assert lock.read_text().strip() == str(victim.pid)  # the dead owner's lock file stays behind
    start = time.monotonic()
    out, err = _run(tmp_path, env, timeout=120)
    assert out.startswith("answer 42") and _building(err) == 1
    assert time.monotonic() - start < 120
    assert not list((tmp_path / "cache" / "hybridssm").glob("*.build-*"))  # the killed build's files


def test_a_waiter_gives_up_instead_of_hanging(tmp_path, env):
    owner = _start(tmp_path, env, delay=600)
    try:
        owner.wait_for("building fused CPU kernels")
        out, err = _run(tmp_path, env, extra_env={"HYBRIDSSM_BUILD_TIMEOUT": "1"}, timeout=120)
        assert f"waiting for process {owner.pid} to finish building" in err
        assert out.startswith("error gave up after 1 s waiting for process")
        assert "HYBRIDSSM_BUILD_TIMEOUT" in out
    finally:
        owner.kill()
        owner.wait()


def test_a_failed_build_writes_the_log_and_raises_a_short_error(tmp_path, env):
    (tmp_path / "src" / "tiny.cpp").write_text(TINY.replace("return m;", "return m  // syntax error"))
    out, err = _run(tmp_path, env)
    first, log_line = out.strip().splitlines()[:2]
    assert first.startswith("error could not compile tiny.cpp: ") and "compiler log: " in first
    log = Path(log_line.removeprefix("log "))
    assert "error" in log.read_text() and "tiny.cpp" in log.read_text()
    assert len(err.strip().splitlines()) == 1, err  # only the building line: the log is in the file


FALLBACK = textwrap.dedent(
    """
    import warnings
    import torch
    from hybridssm.ops import use_kernels
    from hybridssm.ops.scan import selective_scan
    from hybridssm.ops.wkv import wkv6
    from hybridssm.ops.gru import gru
    import hybridssm as hs

    warnings.simplefilter("always")
    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(2, 5, 4, generator=g), torch.rand(2, 5, 4, generator=g)
    A, B, C = -torch.rand(4, 3, generator=g), torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3)
    r = torch.randn(1, 3, 2, 4, generator=g)
    x, h0 = torch.randn(2, 3, 5, generator=g), torch.zeros(2, 4)
    w_ih, w_hh = torch.randn(12, 5, generator=g), torch.randn(12, 4, generator=g)
    runs = [
        lambda: selective_scan(u, dt, A, B, C)[0],
        lambda: wkv6(r, r, r, -r.abs(), torch.zeros(2, 4), torch.zeros(1, 2, 4, 4))[0],
        lambda: gru(x, h0, w_ih, w_hh, torch.zeros(12), torch.zeros(12)),
    ]
    for run in runs:
        auto = run()
        with use_kernels("torch"):
            assert torch.allclose(auto, run())
    print({op: v["backend"] for op, v in hs.kernels().items() if op in ("selective_scan", "wkv6", "gru")})
    """
)


def test_a_failed_build_falls_back_with_one_warning_in_all(tmp_path, env):
    # A compiler that fails at once: three ops, three extensions, one warning naming the way out.
    (tmp_path / "fallback.py").write_text(FALLBACK)
    p = forked.start(tmp_path / "fallback.py", env={**env, "CXX": "false"})
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert out.strip() == "{'gru': 'torch', 'selective_scan': 'torch', 'wkv6': 'torch'}"
    warned = [line for line in err.splitlines() if "Warning" in line]
    assert len(warned) == 1, err
    assert "HYBRIDSSM_KERNELS=torch" in warned[0] and "compiler log: " in warned[0]
    assert len(err) < 2000, err  # no compiler output on the console


def test_kernels_report_builds_nothing(tmp_path, env):
    (tmp_path / "report.py").write_text(
        "import hybridssm as hs; r = hs.kernels(); "
        "print(r['selective_scan']['backend'], '|', r['selective_scan']['reason'])\n")
    p = forked.start(tmp_path / "report.py", env=env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert out.startswith("fused | not built yet; builds on first use")
    assert err == "" and not (tmp_path / "cache").exists()
