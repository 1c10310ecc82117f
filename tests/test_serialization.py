"""save_pretrained / load: exact round trips and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

import hybridssm as hs


@pytest.fixture
def saved(tmp_path):
    model = hs.build("gated_ssm", embed_dim=5, hidden_size=8).eval()
    path = model.save_pretrained(tmp_path / "ckpt")
    return model, path


def test_files_and_round_trip(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["model"] == "gated_ssm" and meta["config"]["hidden_size"] == 8
    loaded = hs.load(path)
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        assert not loaded.training and torch.equal(loaded(x), model(x))


def test_bf16_model_round_trips_in_bf16(tmp_path):
    model = hs.build("gated_ssm", embed_dim=5, hidden_size=8).to(torch.bfloat16)
    loaded = hs.load(model.save_pretrained(tmp_path / "m"))
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b), n


def test_missing_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hs.load(tmp_path / "nowhere")
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors not found"):
        hs.load(path)


def test_corrupted_files(saved):
    _, path = saved
    w = path / "model.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(ValueError, match="model.safetensors is corrupted"):
        hs.load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is corrupted"):
        hs.load(path)


def test_config_weights_mismatch(saved):
    _, path = saved
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["hidden_size"] = 16
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match.*config wants"):
        hs.load(path)
    meta["config"]["hidden_size"] = 8
    meta["config"]["num_layers"] = 3
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing weights"):
        hs.load(path)


def test_failed_save_leaves_previous_files(saved, monkeypatch):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(path)
    assert (path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
