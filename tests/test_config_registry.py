"""Configs, the registry and the seeds' API functions."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import hybridssm as hs
from hybridssm.models.gated_ssm import GatedSSMConfig


def test_build_equals_model_of_config():
    torch.manual_seed(0)
    a = hs.build("gated_ssm", embed_dim=7, hidden_size=16)
    torch.manual_seed(0)
    b = hs.GatedSSM(GatedSSMConfig(embed_dim=7, hidden_size=16))
    assert a.config == b.config
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_configs_are_frozen_and_round_trip():
    cfg = GatedSSMConfig(embed_dim=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 3
    assert GatedSSMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.replace(hidden_size=32).hidden_size == 32
    with pytest.raises(TypeError, match="did you mean 'state_size'"):
        cfg.replace(stat_size=3)


def test_seed_defaults_and_recommended():
    cfg = GatedSSMConfig(embed_dim=287)
    assert (cfg.hidden_size, cfg.state_size, cfg.expand_factor, cfg.conv_size, cfg.num_layers) == (
        256, 16, 2, 4, 2,
    )
    assert cfg.window_size == 60 and cfg.checkpoint_every == 0 and cfg.expected_seq_len == 60
    rec = hs.recommended_defaults("gated_ssm")
    assert rec == dict(hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2,
                       window_size=60, dropout=0.1)
    rec["hidden_size"] = 1  # a fresh dict every call
    assert hs.recommended_defaults("gated_ssm")["hidden_size"] == 256


def test_output_size_and_param_count_without_allocation(monkeypatch):
    assert hs.output_size("gated_ssm") == 256
    assert hs.output_size("gated_ssm", hidden_size=64) == 64
    n = hs.param_count("gated_ssm", embed_dim=287)
    assert n == sum(p.numel() for p in hs.build("gated_ssm", embed_dim=287).parameters())
    # large configs are counted without allocating their weights
    assert hs.param_count("gated_ssm", embed_dim=4096, hidden_size=8192, num_layers=8) > 1e9


@pytest.mark.parametrize(
    "opts, match",
    [
        (dict(state_size=0), r"'state_size' must be a positive integer.*got 0"),
        (dict(expand_factor=1.5), r"'expand_factor'.*1\.5"),
        (dict(conv_size=True), r"'conv_size'.*True"),
        (dict(dropout=-0.1), r"'dropout' must be a number in \[0, 1\).*-0\.1"),
        (dict(checkpoint_every=-1), r"'checkpoint_every'.*-1"),
        (dict(seq_len=0), r"'seq_len'.*0"),
        (dict(embed_dim="3"), r"'embed_dim'.*'3'"),
    ],
)
def test_bad_values_name_option_value_and_rule(opts, match):
    with pytest.raises(ValueError, match=match):
        hs.build("gated_ssm", **{"embed_dim": 4, **opts})


def test_unknown_model_suggests():
    with pytest.raises(ValueError, match="did you mean 'gated_ssm'"):
        hs.build("gated_sm", embed_dim=3)


def test_list_models_contains_registered():
    assert "gated_ssm" in hs.list_models()
    assert hs.list_models() == sorted(hs.list_models())


def test_lists_become_tuples_so_a_config_equals_its_json_round_trip():
    """Lists given to a config (also nested inside hybrid's ``backbone_options``) are held as
    tuples, so that the config equals what its JSON gives back."""
    from hybridssm.models import HybridConfig

    cfg = HybridConfig(embed_dim=4, hidden_size=32, backbone="mamba2",
                       backbone_options={"A_init_range": [1.0, 8.0], "dt_limit": [0.0, 4.0]})
    assert cfg.backbone_options == {"A_init_range": (1.0, 8.0), "dt_limit": (0.0, 4.0)}
    assert HybridConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    mamba2 = hs.get_config_class("mamba2")(embed_dim=4, hidden_size=32, A_init_range=[2.0, 4.0])
    assert mamba2.A_init_range == (2.0, 4.0)
    assert type(mamba2).from_dict(json.loads(json.dumps(mamba2.to_dict()))) == mamba2
    from hybridssm.config import _frozen

    assert _frozen({"a": [1, [2, {"b": [3]}]]}) == {"a": (1, (2, {"b": (3,)}))}  # at any depth
