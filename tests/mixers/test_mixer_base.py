"""The shared part of every mixer (mixers/base.py)."""

import pytest
import torch

import hybridssm as hs


@pytest.mark.parametrize("name,opts", [("mamba", {}), ("transformer", {}), ("hybrid", {"backbone": "gru"}),
                                       ("mamba2", {})])
def test_init_state_with_device_and_dtype_walks_no_parameters(name, opts, monkeypatch):
    # A reset builds a fresh state every step that has one: with device and dtype given, a mixer
    # takes them as they are instead of looking up a parameter (a generator walk per mixer).
    model = hs.build(name, embed_dim=8, hidden_size=16, num_layers=2, **opts)
    mixers = [m for m in model.modules() if isinstance(m, hs.mixers.Mixer)]
    assert mixers
    model.double()  # a state's dtype follows the parameters
    for m in mixers:
        monkeypatch.setattr(m, "_param", lambda: pytest.fail("init_state walked the parameters"))
    state = model.init_state(3, device=torch.device("cpu"), dtype=torch.float64)
    leaves = [t for t in torch.utils._pytree.tree_leaves(state) if t.is_floating_point()]
    assert leaves and all(t.dtype == torch.float64 for t in leaves)
