"""``hybridssm bench`` looks the model's config class up once and validates the options once,
before it measures anything."""

from __future__ import annotations

import hybridssm.bench as bench
import hybridssm.registry as registry
from hybridssm import cli


def _spies(monkeypatch):
    calls = {"lookups": [], "validations": 0, "rates": 0, "rows": []}
    real_lookup = registry.get_config_class
    config_class = real_lookup("gated_ssm")
    real_from_options = config_class.from_options.__func__

    def lookup(name):
        calls["lookups"].append(name)
        return real_lookup(name)

    def from_options(cls, **opts):
        calls["validations"] += 1
        return real_from_options(cls, **opts)

    def rates(*a, **k):
        calls["rates"] += 1
        return {"gemm_gflops": 1.0, "exp_gelems": 1.0}

    def bench_model(name, opts, shape, **kw):
        calls["rows"].append((name, dict(opts), shape))
        return [{"model": name, "shape": str(shape), "params": 1, "fwd_bwd_tok_s": 1.0, "fwd_tok_s": 1.0,
                 "step_ms": 1.0, "window_ms": 1.0, "peak_mib": None, "ratio": 1.0}]

    monkeypatch.setattr(registry, "get_config_class", lookup)
    monkeypatch.setattr(config_class, "from_options", classmethod(from_options))
    monkeypatch.setattr(bench, "machine_rates", rates)
    monkeypatch.setattr(bench, "bench_model", bench_model)
    return calls


def test_bench_validates_once_before_measuring(capsys, monkeypatch):
    calls = _spies(monkeypatch)
    assert cli.main(["bench", "gated_ssm", "--hidden-size", "16", "--shape", "long", "--no-memory"]) == 0
    assert calls["lookups"] == ["gated_ssm"] and calls["validations"] == 1 and calls["rates"] == 1
    assert [shape for *_, shape in calls["rows"]] == bench.SHAPES["long"]
    assert all(opts == {"hidden_size": 16, "embed_dim": 16} for _, opts, _ in calls["rows"])
    assert "| gated_ssm | (2, 4096) |" in capsys.readouterr().out


def test_bench_refuses_a_bad_option_before_measuring(capsys, monkeypatch):
    calls = _spies(monkeypatch)
    assert cli.main(["bench", "gated_ssm", "--hidden-size", "0"]) == 2
    assert "hidden_size" in capsys.readouterr().err
    assert calls["rates"] == 0 and calls["rows"] == [] and calls["lookups"] == ["gated_ssm"]
