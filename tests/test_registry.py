"""The one registry type (models, backbones, tasks) and user-registered tasks."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import pytest
import torch

import hybridssm as hs
from hybridssm import backbones, cli
from hybridssm.registry import MODELS, Registry
from hybridssm.tasks import IGNORE, TASKS, Task, build_task, list_tasks
from hybridssm.training import TrainConfig, train


def test_registry_by_call_and_by_decorator():
    r: Registry[object] = Registry("widget", hint="see the docs")
    a = object()
    assert r.register("alpha", a) is a

    @r.register("beta")
    def beta():
        return 2

    assert r.get("alpha") is a and r["beta"] is beta and beta() == 2
    assert r.names() == ["alpha", "beta"] and list(r) == ["alpha", "beta"] and len(r) == 2
    assert r.items() == [("alpha", a), ("beta", beta)]
    assert "alpha" in r and "gamma" not in r and {"unhashable": 1} not in r


def test_registry_unknown_name_suggests_and_lists():
    r: Registry[int] = Registry("widget", hint="see the docs")
    r.register("alpha", 1)
    r.register("beta", 2)
    with pytest.raises(ValueError, match=r"unknown widget 'alpah' \(did you mean 'alpha'\?\); "
                                         r"available: alpha, beta \(see the docs\)"):
        r.get("alpah")
    with pytest.raises(ValueError, match="unknown widget 3"):
        r.get(3)


def test_registry_duplicate_names():
    r: Registry[object] = Registry("widget")
    a, b = object(), object()
    r.register("alpha", a)
    assert r.register("alpha", a) is a  # the same object again: a module imported twice
    with pytest.raises(ValueError, match="widget 'alpha' is already registered.*replace=True"):
        r.register("alpha", b)
    assert r.get("alpha") is a
    r.register("alpha", b, replace=True)
    assert r.get("alpha") is b and r.pop("alpha") is b and "alpha" not in r
    with pytest.raises(ValueError, match="non-empty string"):
        r.register("", a)


def test_a_new_definition_of_the_same_code_replaces_it():
    def define():  # a module or notebook cell run twice defines a new class of the same name
        class Thing:
            pass

        return Thing

    r: Registry[object] = Registry("widget")
    first, second = define(), define()
    r.register("thing", first)
    r.register("thing", second)
    assert r.get("thing") is second
    r.register("f", lambda: 1)
    with pytest.raises(ValueError, match="already registered"):  # lambdas share one name
        r.register("f", lambda: 2)


def test_models_backbones_and_tasks_share_the_type():
    assert all(isinstance(r, Registry) for r in (MODELS, backbones._BACKBONES, TASKS))
    assert MODELS.names() == hs.list_models() and TASKS.names() == list_tasks()
    assert backbones._BACKBONES.names() == hs.list_backbones()


def test_a_model_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="model 'mamba' is already registered"):
        hs.register_model("mamba", hs.MambaConfig)(type("Other", (hs.Mamba,), {}))
    assert MODELS.get("mamba") is hs.Mamba


def test_backbone_duplicates_and_replacement():
    def a(hidden_size):
        return hs.GRUMixer(hidden_size)

    def b(hidden_size):
        return hs.GRUMixer(hidden_size)

    try:
        hs.register_backbone("dup_test", a)
        hs.register_backbone("dup_test", a)  # the same factory again is fine
        with pytest.raises(ValueError, match="backbone 'dup_test' is already registered"):
            hs.register_backbone("dup_test", b)
        assert backbones.get_backbone("dup_test").factory is a
        hs.register_backbone("dup_test", b, replace=True)
        assert backbones.get_backbone("dup_test").factory is b
        with pytest.raises(ValueError, match="built in"):
            hs.register_backbone("gru", b, replace=True)
    finally:
        backbones._BACKBONES.pop("dup_test")


# -- user tasks -------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FirstToken(Task):
    """Recall the first token at the last position."""

    vocab: int = 8
    seq_len: int = 6

    @property
    def vocab_size(self) -> int:
        return self.vocab

    def _generate(self, n, gen, split):
        tokens = torch.randint(0, self.vocab, (n, self.seq_len), generator=gen)
        targets = torch.full_like(tokens, IGNORE)
        targets[:, -1] = tokens[:, 0]
        return tokens, targets


@pytest.fixture
def first_token():
    hs.register_task("first_token", FirstToken)
    yield
    TASKS.pop("first_token")


def test_register_task_makes_it_buildable_and_trainable(first_token):
    assert "first_token" in list_tasks()
    task = build_task("first_token", vocab=5)
    tokens, targets = task.generate(3, seed=1)
    assert tokens.shape == (3, 6) and torch.equal(targets[:, -1], tokens[:, 0])
    with pytest.raises(TypeError, match="did you mean 'vocab'"):
        build_task("first_token", vocb=5)
    with pytest.raises(ValueError, match="did you mean 'first_token'"):
        build_task("first_tokn")
    cfg = TrainConfig(model="gated_ssm", model_options=dict(hidden_size=8, num_layers=1),
                      task="first_token", steps=2, batch_size=4, eval_every=2, eval_size=4,
                      progress=False)
    assert 0.0 <= train(cfg).final["test_acc"] <= 1.0


def test_register_task_refuses_what_the_cli_cannot_use():
    with pytest.raises(TypeError, match="Task subclass"):
        hs.register_task("f", lambda **kw: FirstToken(**kw))

    class NotADataclass(FirstToken):
        extra = 1

    with pytest.raises(TypeError, match=r"@dataclass\(frozen=True, kw_only=True\)"):
        hs.register_task("g", NotADataclass)
    with pytest.raises(ValueError, match="identifier"):
        hs.register_task("no spaces", FirstToken)
    with pytest.raises(ValueError, match="task 'mqar' is already registered"):
        hs.register_task("mqar", FirstToken)


PLUGIN = '''
from dataclasses import dataclass
import torch
import hybridssm as hs
from hybridssm.tasks import IGNORE, Task

@dataclass(frozen=True, kw_only=True)
class LastToken(Task):
    """Repeat the last token."""
    seq_len: int = 5

    @property
    def vocab_size(self):
        return 4

    def _generate(self, n, gen, split):
        tokens = torch.randint(0, 4, (n, self.seq_len), generator=gen)
        return tokens, torch.where(torch.arange(self.seq_len) == self.seq_len - 1, tokens, IGNORE)

hs.register_task("last_token", LastToken)
'''


def test_cli_trains_a_registered_task(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_task_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code = cli.main(["--import", "my_task_plugin", "train", "gated_ssm", "--task", "last_token",
                         "--task-opt", "seq_len=7", "--hidden-size", "8", "--num-layers", "1",
                         "--steps", "2", "--batch-size", "4", "--eval-size", "4", "--no-progress"])
        out = capsys.readouterr().out
        assert code == 0, out
        assert "test_acc" in json.loads(out.strip().splitlines()[-1])
    finally:
        TASKS.pop("last_token")
        sys.modules.pop("my_task_plugin", None)
