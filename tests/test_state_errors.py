"""A state that does not fit the model raises a ValueError naming ``state``, the layer and the field,
with the expected and the actual value, for every registered model (and hybrid backbone)."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils import _pytree as pytree

import hybridssm as hs
from conformance_cases import Case, cached_model, tiny_cases

CASES = tiny_cases()
OTHER = {"transformer": dict(num_heads=2, head_dim=8), "gated_ssm": {}}


def _ids(case: Case) -> str:
    return case.id


def _replace_leaf(state, pick, fn):
    """``state`` with ``fn`` applied to the leaf ``pick(leaves)`` selects; returns (state, its path)."""
    leaves, spec = pytree.tree_flatten_with_path(state)
    i = pick([t for _, t in leaves])
    path = pytree.keystr(leaves[i][0])
    new = [fn(t) if j == i else t for j, (_, t) in enumerate(leaves)]
    return pytree.tree_unflatten(new, spec), path


def _both_entry_points(model, x, state, match):
    with pytest.raises(ValueError, match=match):
        model(x, state=state)
    with pytest.raises(ValueError, match=match):
        model.step(x[:, 0], state)


def _first_float(leaves):
    return next(i for i, t in enumerate(leaves) if t.is_floating_point())


def _last_float(leaves):
    return max(i for i, t in enumerate(leaves) if t.is_floating_point())


@pytest.mark.parametrize("case", CASES, ids=_ids)
@torch.no_grad()
def test_a_state_field_in_another_dtype(case):
    model = cached_model(case)
    x = torch.randn(2, 3, model.config.embed_dim)
    # the last layer's last field (the shape test below changes the first layer's first)
    state, path = _replace_leaf(model.init_state(2), _last_float, lambda t: t.double())
    _both_entry_points(model, x, state, rf"^state{re.escape(path)}: expected dtype torch\.float32 "
                                        r".*got torch\.float64")


@pytest.mark.parametrize("case", CASES, ids=_ids)
@torch.no_grad()
def test_a_state_position_in_another_dtype_or_device(case):
    model = cached_model(case)
    x = torch.randn(2, 3, model.config.embed_dim)
    state = model.init_state(2)
    _both_entry_points(model, x, state._replace(pos=state.pos.int()),
                       r"^state\.pos: expected dtype torch\.int64 .*got torch\.int32")
    _both_entry_points(model, x, state._replace(pos=state.pos.to("meta")), r"^state\.pos: .*on meta")


@pytest.mark.parametrize("case", CASES, ids=_ids)
@torch.no_grad()
def test_a_state_field_of_another_shape(case):
    model = cached_model(case)
    x = torch.randn(2, 3, model.config.embed_dim)
    state, path = _replace_leaf(model.init_state(2), _first_float, lambda t: t[..., :-1])
    field = re.escape(path.rsplit(".", 1)[-1])
    _both_entry_points(model, x, state, rf"^state\.layers\[0\].*\.{field}: expected shape")


@pytest.mark.parametrize("case", CASES, ids=_ids)
@torch.no_grad()
def test_a_state_of_another_batch_size(case):
    model = cached_model(case)
    x = torch.randn(2, 3, model.config.embed_dim)
    _both_entry_points(model, x, model.init_state(3), r"^state\.pos: expected shape \(2,\) .*got \(3,\)")
    layers_only = model.init_state(3)._replace(pos=torch.zeros(2, dtype=torch.long))
    _both_entry_points(model, x, layers_only, r"^state\.layers\[0\].*expected shape")


@pytest.mark.parametrize("case", CASES, ids=_ids)
@torch.no_grad()
def test_a_state_of_another_model(case):
    model = cached_model(case)
    x = torch.randn(2, 3, model.config.embed_dim)
    # a model of another kind (attention layers, or SSM layers), with as many layers
    other_name = "transformer" if case.name != "transformer" else "gated_ssm"
    other = hs.build(other_name, embed_dim=model.config.embed_dim, hidden_size=16,
                     num_layers=model.config.num_layers, **OTHER[other_name])
    _both_entry_points(model, x, other.init_state(2), r"^state\.layers\[\d+\].*(another model|expected)")
    _both_entry_points(model, x, (1, 2), r"^state: expected a ModelState")
    state = model.init_state(2)
    _both_entry_points(model, x, state._replace(layers=list(state.layers)),
                       r"^state\.layers: expected a tuple")


@pytest.mark.parametrize("case", CASES[:1] + [c for c in CASES if c.name == "hymba"][:1], ids=_ids)
def test_init_state_in_another_dtype_is_refused(case):
    model = cached_model(case)
    with pytest.raises(ValueError, match=r"dtype: a state's dtype follows the model's parameters "
                                         r"\(torch\.float32\), got torch\.float64"):
        model.init_state(2, dtype=torch.float64)
    assert model.init_state(2, dtype=torch.float32).pos.shape == (2,)
