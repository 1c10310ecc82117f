"""The hybrid's recurrent backbones: GRU, RWKV-6, Griffin RG-LRU (mixer contract + parity)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_tree_close
from hybridssm.backbones import get_backbone
from hybridssm.mixers.gru import GRUMixer
from hybridssm.mixers.rglru import RGLRUMixer, RGLRUState
from hybridssm.mixers.rwkv import RWKVMixer
from hybridssm.ops import use_kernels

D, T = 16, 11  # T = 2 * chunk + 3 for the RWKV chunk of 4

FACTORIES = {
    "gru": lambda: GRUMixer(D),
    "rwkv": lambda: RWKVMixer(D, head_dim=4, mix_lora_rank=4, decay_lora_rank=4, scan_chunk_size=4),
    "griffin_lru": lambda: RGLRUMixer(D, conv_size=4, gate_heads=2),
}


def _perturbed(name: str) -> torch.nn.Module:
    """A mixer in eval mode with every parameter moved off its init (RWKV starts as the identity)."""
    torch.manual_seed(0)
    m = FACTORIES[name]().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def _x(B=3, T_=T, seed=1):
    return torch.randn(B, T_, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(FACTORIES))
def name(request):
    return request.param


def test_step_equals_forward(name):
    m, x = _perturbed(name), _x()
    with torch.no_grad():
        y, s_full = m(x)
        s = m.init_state(x.shape[0])
        buf = m.init_state(x.shape[0])
        ys, ys_inplace = [], []
        for t in range(T):
            before = [b.clone() for b in s]
            y_t, s_next = m(x[:, t : t + 1], s)
            for b0, b1 in zip(before, s):  # the functional path never touches the state passed in
                assert torch.equal(b0, b1)
            s = s_next
            ys.append(y_t)
            y_i, out = m(x[:, t : t + 1], buf, inplace=True)
            assert all(o is b for o, b in zip(out, buf))
            ys_inplace.append(y_i)
    assert_close(torch.cat(ys, 1), y, msg="functional steps")
    assert_tree_close(s, s_full, msg="functional final state")
    assert_close(torch.cat(ys_inplace, 1), y, msg="inplace steps")
    assert_tree_close(buf, s_full, msg="inplace final state")


def test_chunked_forward_from_state(name):
    m, x = _perturbed(name), _x()
    with torch.no_grad():
        y, s_full = m(x)
        y1, s = m(x[:, :3])
        y2, s = m(x[:, 3:8], s)
        y3, s = m(x[:, 8:], s)
    assert_close(torch.cat([y1, y2, y3], 1), y)
    assert_tree_close(s, s_full)


def test_lengths(name):
    m, x = _perturbed(name), _x()
    lengths = torch.tensor([T, 5, 1])
    nxt = _x(T_=4, seed=2)
    with torch.no_grad():
        y, s = m(x, lengths=lengths)
        y_next, _ = m(nxt, s)
        for b, n in enumerate(lengths.tolist()):
            y_b, s_b = m(x[b : b + 1, :n])
            assert_close(y[b : b + 1, :n], y_b, msg=f"row {b} outputs")
            assert_tree_close(tuple(t[b : b + 1] for t in s), tuple(s_b), msg=f"row {b} state")
            y_nb, _ = m(nxt[b : b + 1], s_b)
            assert_close(y_next[b : b + 1], y_nb, msg=f"row {b} continued")
        assert torch.isfinite(y).all()


def test_gradients_finite(name):
    m, x = _perturbed(name), _x()
    m.train()
    s0 = tuple(t.clone().requires_grad_() if t.is_floating_point() else t for t in m.init_state(3))
    y, s = m(x, type(m.init_state(1))(*s0))
    loss = y.square().mean() + sum(t.float().square().mean() for t in s if t.is_floating_point())
    loss.backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_compile_step(name):
    m, x = _perturbed(name), _x()
    with torch.no_grad():
        step = torch.compile(m, fullgraph=True, backend="aot_eager")
        s_ref = s = m.init_state(3)
        for t in range(2):
            y, s = step(x[:, t : t + 1], s)
            y_ref, s_ref = m(x[:, t : t + 1], s_ref)
            assert_close(y, y_ref)
    assert_tree_close(s, s_ref)


@pytest.mark.slow
def test_compile_forward(name):
    m, x = _perturbed(name), _x()
    with torch.no_grad():
        y_ref, s_ref = m(x)
        y, s = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=False)(x)
    assert_close(y, y_ref)
    assert_tree_close(s, s_ref)


def test_bf16_autocast_keeps_fp32_state(name):
    m, x = _perturbed(name), _x()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = m(x)
    assert torch.isfinite(y.float()).all()
    recurrent = s.wkv if name == "rwkv" else s.h
    assert recurrent.dtype == torch.float32


def test_registered_backbones_build_small():
    for bname, seed in (("gru", {}), ("rwkv", {}), ("griffin_lru", {"conv_size": 4})):
        spec = get_backbone(bname)
        m = spec.factory(32, **seed)
        y, _ = m(torch.randn(2, 3, 32))
        assert y.shape == (2, 3, 32)
    assert get_backbone("griffin_lru").seed_options == ("conv_size",)


@pytest.mark.parametrize(
    "factory",
    [
        lambda: RWKVMixer(16, head_dim=5),
        lambda: RWKVMixer(16, scan_chunk_size=0),
        lambda: RWKVMixer(16, init_layer_ratio=2.0),
        lambda: RGLRUMixer(16, gate_heads=3),
        lambda: RGLRUMixer(16, conv_size=0),
        lambda: RGLRUMixer(16, lru_width=0),
        lambda: GRUMixer(0),
    ],
)
def test_bad_options(factory):
    with pytest.raises(ValueError):
        factory()


# ----------------------------------------------------------------------------- parity: GRU


@pytest.mark.parametrize("backend", ["fused", "torch", "ref"])
def test_gru_matches_torch_gru(backend):
    m, x = _perturbed("gru"), _x()
    ref = torch.nn.GRU(D, D, batch_first=True)
    ref.load_state_dict({f"{name}_l0": p for name, p in m.state_dict().items()})
    h0 = torch.randn(3, D)
    with torch.no_grad(), use_kernels(backend):
        y_ref, h_ref = ref(x, h0.unsqueeze(0))
        y, s = m(x, type(m.init_state(1))(h0.clone()))
        assert_close(y, y_ref)
        assert_close(s.h, h_ref[0])
        s = type(s)(h0.clone())
        ys = []
        for t in range(T):
            y_t, s = m(x[:, t : t + 1], s)
            ys.append(y_t)
    assert_close(torch.cat(ys, 1), y_ref, msg="stepped")
    assert_close(s.h, h_ref[0], msg="stepped state")


# ----------------------------------------------------------------------------- parity: RWKV-6


def _textbook_rwkv6_layer(m: RWKVMixer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-6 written token by token from the paper: returns (time-mix outputs, layer outputs)."""
    tm, cm = m.time_mix, m.channel_mix
    B, T_, D_ = x.shape
    H, K = m.num_heads, m.head_dim
    R = tm.mix_down.shape[1] // 5

    def ln(z, norm):
        return F.layer_norm(z, (D_,), norm.weight, norm.bias, norm.eps)

    S = torch.zeros(B, H, K, K)
    prev_h, prev_c = torch.zeros(B, D_), torch.zeros(B, D_)
    tms, outs = [], []
    for t in range(T_):
        xt = x[:, t]
        h = ln(xt, m.ln_time)
        dx = prev_h - h
        lo = torch.tanh((h + dx * tm.mu_x) @ tm.mix_down).view(B, 5, R)
        mw, mk, mv, mr, mg = (lo[:, i] @ tm.mix_up[i] for i in range(5))
        xw, xk = h + dx * (tm.mu_w + mw), h + dx * (tm.mu_k + mk)
        xv, xr, xg = h + dx * (tm.mu_v + mv), h + dx * (tm.mu_r + mr), h + dx * (tm.mu_g + mg)
        r = (xr @ tm.receptance.weight.T).view(B, H, K)
        k = (xk @ tm.key.weight.T).view(B, H, K)
        v = (xv @ tm.value.weight.T).view(B, H, K)
        g = F.silu(xg @ tm.gate.weight.T)
        decay = torch.exp(-torch.exp(tm.decay + torch.tanh(xw @ tm.decay_down) @ tm.decay_up)).view(B, H, K)
        kv = k.unsqueeze(-1) * v.unsqueeze(-2)
        o = torch.einsum("bhk,bhkv->bhv", r, S + tm.bonus.unsqueeze(-1) * kv)
        S = decay.unsqueeze(-1) * S + kv
        mu, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
        o = ((o - mu) / torch.sqrt(var + tm.ln_x_eps)).reshape(B, D_) * tm.ln_x_weight + tm.ln_x_bias
        a = (o * g) @ tm.output.weight.T
        tt = xt + a
        c = ln(tt, m.ln_channel)
        dc = prev_c - c
        kk = torch.relu((c + dc * cm.mu_k) @ cm.key.weight.T) ** 2
        ffn = torch.sigmoid((c + dc * cm.mu_r) @ cm.receptance.weight.T) * (kk @ cm.value.weight.T)
        tms.append(a)
        outs.append(tt + ffn)
        prev_h, prev_c = h, c
    return torch.stack(tms, 1), torch.stack(outs, 1)


def test_rwkv_matches_textbook_layer():
    m, x = _perturbed("rwkv"), _x()
    with torch.no_grad():
        tm_ref, layer_ref = _textbook_rwkv6_layer(m, x)
        h = m.ln_time(x)
        s0 = m.init_state(3)
        tm_out, _ = m.time_mix(h, s0.shift_time, s0.wkv, None)
        y, _ = m(x)
    assert_close(tm_out, tm_ref, msg="time-mix")
    assert_close(x + y, layer_ref, msg="layer x + mixer(x)")


def test_rwkv_fresh_layer_is_identity():
    """RWKV-LM zero-inits the output projections: a fresh layer adds nothing."""
    m = RWKVMixer(32)
    y, _ = m(torch.randn(2, 5, 32))
    assert torch.count_nonzero(y) == 0


# ----------------------------------------------------------------------------- parity: Griffin


def test_rglru_first_position_rule():
    """A state at position 0 ignores its h (a = 0); a continuation (pos > 0) uses it."""
    m, x = _perturbed("griffin_lru"), _x()
    s0 = m.init_state(3)
    h = torch.randn_like(s0.h)
    with torch.no_grad():
        y_fresh, _ = m(x)
        y_pos0, _ = m(x, RGLRUState(s0.conv, h, s0.pos))
        y_pos5, _ = m(x, RGLRUState(s0.conv, h, s0.pos + 5))
    assert_close(y_pos0, y_fresh)
    assert not torch.allclose(y_pos5, y_fresh)


def test_rglru_init_radius():
    m = RGLRUMixer(256)
    radius = torch.exp(-F.softplus(m.a_param))
    assert radius.min() >= 0.9 - 1e-6 and radius.max() <= 0.999 + 1e-6
    assert m.a_param.dtype == torch.float32


def _hf_block(m: RGLRUMixer):
    transformers = pytest.importorskip("transformers")
    from transformers.models.recurrent_gemma.modeling_recurrent_gemma import RecurrentGemmaRecurrentBlock

    # lru_width == hidden_size: transformers sizes its conv cache by hidden_size (wrong otherwise)
    cfg = transformers.RecurrentGemmaConfig(
        hidden_size=m.hidden_size,
        lru_width=m.lru_width,
        num_attention_heads=m.gate_heads,
        conv1d_width=m.conv_size,
        hidden_activation="gelu_pytorch_tanh",
    )
    blk = RecurrentGemmaRecurrentBlock(cfg, 0).eval()
    with torch.no_grad():
        for name in ("linear_y", "linear_x", "linear_out"):
            getattr(blk, name).load_state_dict(getattr(m, name).state_dict())
        blk.conv_1d.weight.copy_(m.conv_weight.unsqueeze(1))
        blk.conv_1d.bias.copy_(m.conv_bias)
        lru = blk.rg_lru
        lru.recurrent_param.copy_(m.a_param)
        lru.input_gate_weight.copy_(m.input_gate_weight)
        lru.input_gate_bias.copy_(m.input_gate_bias)
        lru.recurrent_gate_weight.copy_(m.a_gate_weight)
        lru.recurrent_gate_bias.copy_(m.a_gate_bias)
    return blk


def test_rglru_matches_transformers_block():
    m, x = _perturbed("griffin_lru"), _x()
    blk = _hf_block(m)
    B = x.shape[0]
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        y_hf, _ = blk(x, pos, None, use_cache=False)
        y, _ = m(x)
        assert_close(y, y_hf, msg="forward")
        # transformers' cached path: prefill 6 positions, then decode one at a time
        blk._setup_cache(B, x.device, x.dtype)
        y_pre, _ = blk(x[:, :6], pos[:, :6], None, use_cache=True)
        ys = [y_pre]
        for t in range(6, T):
            y_t, _ = blk(x[:, t : t + 1], pos[:, t : t + 1], None, use_cache=True)
            ys.append(y_t)
        y_ours, s = m(x[:, :6])
        ys_ours = [y_ours]
        for t in range(6, T):
            y_t, s = m(x[:, t : t + 1], s)
            ys_ours.append(y_t)
    assert_close(torch.cat(ys, 1), y_hf, msg="transformers' own cache vs its forward")
    assert_close(torch.cat(ys_ours, 1), torch.cat(ys, 1), msg="prefill + steps")
    assert_close(s.h, blk.rg_lru.recurrent_states, msg="recurrent state")
    assert math.isclose(float(s.pos[0]), T)
