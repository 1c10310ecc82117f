"""The fused Mamba-2 step with the reference's options beyond its defaults (``proj_bias``,
``D_has_hdim``, ``norm_before_gate``, a ``dt_limit`` clamp), each alone and all together: the mixer
kernel equals the mixer's forward at T = 1, and a model's one-call step takes the fused path and
equals both its block-by-block step and its forward."""

from __future__ import annotations

import pytest
import torch

import hybridssm as hs
from helpers import assert_close, assert_tree_close, block_by_block, stream
from hybridssm.mixers.mamba2 import Mamba2Mixer
from hybridssm.ops.step import mixer_step
from hybridssm.streaming import plan_status

D, E_IN = 16, 6
# a dt_limit that clamps on both sides at the init's dt (dt_bias spans softplus^-1 of 1e-3 .. 1e-1)
OPTIONS = {
    "proj_bias": dict(proj_bias=True),
    "D_has_hdim": dict(D_has_hdim=True),
    "norm_before_gate": dict(norm_before_gate=True),
    "dt_limit": dict(dt_limit=(0.005, 0.05)),
    "dt_limit upper only": dict(dt_limit=(0.0, 0.02)),
    "all": dict(proj_bias=True, D_has_hdim=True, norm_before_gate=True, dt_limit=(0.005, 0.05)),
}


def _perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero biases, per-channel D and non-trivial norms, so that every option's weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("bias", ".D", "norm.weight")) and "dt_bias" not in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 6])
@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_mixer_kernel_with_option_equals_forward(case, B, dtype):
    torch.manual_seed(0)
    m = _perturbed(Mamba2Mixer(D, state_size=8, conv_size=3, ssm_head_dim=8, num_groups=2, **OPTIONS[case]))
    m = m.to(dtype)
    spec = m.step_spec()
    assert spec is not None and spec.kind == "mamba2"
    cls = "fp64" if dtype == torch.float64 else "fp32"
    x = torch.randn(B, 5, D, dtype=dtype)
    with torch.no_grad():
        _, s_ref = m(torch.randn(B, 3, D, dtype=dtype))  # a non-zero starting state
        s = [t.clone().contiguous() for t in s_ref]
        pos = torch.zeros(B, dtype=torch.long)
        for t in range(x.shape[1]):
            y_ref, s_ref = m(x[:, t : t + 1], s_ref)
            y = mixer_step(spec, x[:, t], s, pos)
            assert_close(y, y_ref[:, 0], cls, msg=f"{case} t={t}")
            assert_tree_close(type(s_ref)(*s), s_ref, cls, msg=f"{case} t={t} state")


def test_dt_limit_clamps_in_the_kernel():
    # the same mixer without the clamp gives other values: the option is not ignored
    torch.manual_seed(0)
    m = _perturbed(Mamba2Mixer(D, state_size=8, ssm_head_dim=8, dt_limit=(0.005, 0.05)))
    x = torch.randn(2, D)
    state = m.init_state(2)
    pos = torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        y = mixer_step(m.step_spec(), x, [t.clone() for t in state], pos)
        m.dt_limit = (0.0, float("inf"))
        y_free = mixer_step(m.step_spec(), x, [t.clone() for t in state], pos)
    assert not torch.allclose(y, y_free)


def _model(options: dict, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    m = hs.build("mamba2", embed_dim=E_IN, hidden_size=D, num_layers=2, state_size=8, conv_size=3,
                 ssm_head_dim=8, num_groups=2, **options)
    return _perturbed(m.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", sorted(OPTIONS))
def test_model_step_with_option_is_fused_and_equals_block_by_block_and_forward(case, dtype):
    model = _model(OPTIONS[case], dtype)
    assert plan_status(model) == "fused"
    x = torch.randn(3, 7, E_IN, dtype=dtype)
    with torch.no_grad():
        fused, s_fused = stream(model, x, inplace=True)
        with block_by_block(model):
            plain, s_plain = stream(model, x, inplace=True)
        want, s_want = model(x, return_sequence=True, return_state=True)
    cls = "fp64" if dtype == torch.float64 else "fp32"
    assert_close(fused, plain, cls, msg=f"{case}: fused against block by block")
    assert_tree_close(s_fused, s_plain, cls, msg=f"{case}: state, fused against block by block")
    assert_close(fused, want, cls, msg=f"{case}: fused against the forward")
    assert_tree_close(s_fused, s_want, cls, msg=f"{case}: state, fused against the forward")
