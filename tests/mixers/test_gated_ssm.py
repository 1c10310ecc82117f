"""GatedSSM: the causal form against a textbook loop of the seed's equations, and dtypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hybridssm as hs
from helpers import assert_close
from hybridssm.layers import is_fp32_no_decay
from hybridssm.mixers.gated_ssm import GatedSSMMixer


def textbook(m: GatedSSMMixer, x: torch.Tensor) -> torch.Tensor:
    """The seed's equations, one timestep at a time."""
    B, T, _ = x.shape
    K = m.conv_size
    xb, z = m.in_proj(x).chunk(2, -1)
    ctx = torch.zeros(B, m.d_inner)
    ys = []
    for t in range(T):
        window = xb[:, max(0, t - K + 1) : t + 1]
        pooled = window.sum(1) / K  # zeros on the left, divided by K
        u = F.silu(m.conv_proj(pooled))
        Bt, Ct = m.bc_proj(u).chunk(2, -1)
        dt = F.softplus(m.dt_up(m.dt_down(u)))
        gate = torch.sigmoid(dt.mean(-1, keepdim=True))
        bc = torch.sigmoid((Bt * Ct).sum(-1, keepdim=True))
        g = gate * bc * u
        ctx = 0.9 * ctx + 0.1 * g
        ys.append(m.out_proj((g + (1 - gate) * ctx) * F.silu(z[:, t])))
    return torch.stack(ys, 1)


def test_mixer_matches_textbook_loop():
    m = GatedSSMMixer(8, state_size=4, conv_size=3)
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        y, _ = m(x)
        assert_close(y, textbook(m, x))


def test_bf16_autocast_keeps_states_fp32_and_tracks_fp32():
    from helpers import assert_close as close

    m = hs.build("gated_ssm", embed_dim=4, hidden_size=16).eval()
    x = torch.randn(2, 6, 4)
    with torch.no_grad():
        ref = m(x, return_sequence=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, s = m(x, return_sequence=True, return_state=True)
    assert s.layers[0].ctx.dtype == torch.float32
    close(y.float(), ref, "bf16")


def test_dtype_casts_keep_marked_params_fp32():
    m = hs.build("gated_ssm", embed_dim=4, hidden_size=8).to(torch.bfloat16)
    for name, p in m.named_parameters():
        want = torch.float32 if is_fp32_no_decay(p) else torch.bfloat16
        assert p.dtype == want, name
    x = torch.randn(1, 3, 4, dtype=torch.bfloat16)
    assert m(x).dtype == torch.bfloat16


def test_fp64_model_and_gradcheck():
    m = hs.build("gated_ssm", embed_dim=2, hidden_size=4, state_size=2, num_layers=1).double().eval()
    x = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    _, s = m(x, return_state=True)
    assert s.layers[0].ctx.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: m(x, return_sequence=True), (x,))


def test_param_groups_exclude_marked_params_from_decay():
    m = hs.build("gated_ssm", embed_dim=4, hidden_size=8)
    decay, no_decay = m.param_groups(0.1)
    ids_no = {id(p) for p in no_decay["params"]}
    assert id(m.final_norm.weight) in ids_no
    assert all(p.dim() >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


def test_state_is_a_pytree_that_moves_clones_and_indexes():
    m = hs.build("gated_ssm", embed_dim=4, hidden_size=8).eval()
    x = torch.randn(3, 5, 4)
    _, s = m(x, return_state=True)
    leaves, spec = torch.utils._pytree.tree_flatten(s)
    assert len(leaves) == 2 * 2 + 1
    assert torch.utils._pytree.tree_unflatten(leaves, spec) == s
    row = s.index(1)
    assert row.batch_size == 1 and torch.equal(row.layers[0].ctx, s.layers[0].ctx[1:2])
    c = s.clone()
    c.layers[0].ctx.zero_()
    assert s.layers[0].ctx.abs().sum() > 0
    assert s.to(torch.float64).layers[0].ctx.dtype == torch.float64
    assert s.to(torch.float64).pos.dtype == torch.long
    assert s.to("cpu").pos.device.type == "cpu"
