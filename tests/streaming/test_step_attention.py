"""The attention mixer's fused step (``ops/csrc/step/attention.h``) equals its forward at T = 1 with
a state, on the output and on the updated state, over every option the mixer has; bad sizes raise
instead of writing out of bounds."""

from __future__ import annotations

import itertools

import pytest
import torch

import hybridssm as hs
from helpers import assert_bitwise, assert_close, assert_tree_close
from hybridssm.mixers.attention import AttentionMixer, AttentionState
from hybridssm.ops.step import MixerStep, mixer_step

W, P, M = 4, 2, 3  # window, prefix slots, memory kv of the small configs


def _mixer(d=24, H=2, Dh=10, *, window=None, prefix=0, mem=0, rope=False, qk_norm=False, kv_heads=None,
           dtype=torch.float32) -> AttentionMixer:
    m = AttentionMixer(d, H, Dh, window_size=window, num_prefix=prefix, num_memory_kv=mem,
                       positional="rope" if rope else "none", qk_layernorm=qk_norm, num_kv_heads=kv_heads)
    with torch.no_grad():  # every weight non-trivial: biases, norm gains and shifts, memory kv
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.to(dtype).eval()


def _set_rope_base(m: AttentionMixer, base: float) -> None:
    """A non-default RoPE base, under the option's name in this version of the mixer."""
    m.__dict__["rope_theta" if hasattr(m, "rope_theta") else "rope_base"] = base


def _clone(state: AttentionState) -> AttentionState:
    return AttentionState(*(s.clone() for s in state))


def _step_both(m: AttentionMixer, x, ref: AttentionState, fused: AttentionState, spec: MixerStep, msg=""):
    """One frame through the forward (``ref`` in place) and the kernel (``fused`` in place)."""
    with torch.no_grad():
        y_ref, _ = m(x[:, None], ref, inplace=True)
    y = mixer_step(spec, x, list(fused), fused.pos.clone())
    assert_close(y, y_ref[:, 0], msg=msg)
    assert_tree_close(fused, ref, msg=msg)


def _stream(m: AttentionMixer, B: int, prefill: int, steps: int, max_len: int | None = None, seed: int = 0):
    """Prefill a random-length chunk (rows padded to different lengths, so each row sits at its own
    position), then step both ways and compare at every frame. Returns the positions visited."""
    g = torch.Generator().manual_seed(seed)
    d = m.qkv_proj.in_features
    dtype = m.qkv_proj.weight.dtype
    ref = m.init_state(B, max_len=max_len)
    if prefill:
        lengths = torch.randint(1, prefill + 1, (B,), generator=g)
        lengths[0] = prefill
        with torch.no_grad():
            m(torch.randn(B, prefill, d, generator=g).to(dtype), ref, lengths=lengths, inplace=True)
    fused, spec, seen = _clone(ref), m.step_spec(), []
    for t in range(steps):
        seen.append(ref.pos.clone())
        _step_both(m, torch.randn(B, d, generator=g).to(dtype), ref, fused, spec, f"step {t} at {ref.pos}")
    return torch.stack(seen)


@pytest.mark.parametrize("B", [1, 8])  # 8: the projections take the GEMM branch
@pytest.mark.parametrize(
    "window,prefix,mem,rope,qk_norm",
    list(itertools.product([None, W], [0, P], [0, M], [False, True], [False, True])),
)
def test_step_equals_forward(B, window, prefix, mem, rope, qk_norm):
    m = _mixer(window=window, prefix=prefix, mem=mem, rope=rope, qk_norm=qk_norm)
    prefill = int(torch.randint(0, 8, ()))
    steps = prefix + 2 * W + 3  # wraps the ring twice
    # a full cache stepped to its last slot: the longest row ends at exactly P + max_len
    _stream(m, B, prefill, steps, max_len=None if window else prefill + steps - prefix)


@pytest.mark.parametrize("prefix", [0, P])
def test_ring_before_and_after_wrap(prefix):
    """From an empty state: the window fills (W - 1, W keys seen), then wraps (W + 1, ...)."""
    m = _mixer(window=W, prefix=prefix, rope=True, qk_norm=True)
    seen = _stream(m, 1, 0, prefix + 2 * W + 2)[:, 0] - prefix  # window tokens consumed before each step
    assert {W - 1, W, W + 1} <= set(seen.tolist())


@pytest.mark.parametrize("window", [None, 16])
def test_long_prefill_then_many_steps(window):
    m = _mixer(64, 4, 16, window=window, prefix=P, mem=M, rope=True, qk_norm=True)
    _set_rope_base(m, 500.0)
    prefill = int(torch.randint(20, 90, ()))
    _stream(m, 3, prefill, 60, max_len=None if window else 200, seed=prefill)


def test_odd_head_dim_rope_and_float64():
    """An odd Dh leaves RoPE's last channel unrotated; float64 runs in float64."""
    _stream(_mixer(Dh=7, rope=True, qk_norm=True, mem=M), 2, 5, 8)
    _stream(_mixer(window=W, prefix=P, mem=M, rope=True, qk_norm=True, dtype=torch.float64), 2, 5, 10)


def test_grouped_query_heads():
    """Hkv kv heads serve H / Hkv query heads each (query head h reads kv head h // (H / Hkv)): the
    kernel with Hkv heads equals an H-head mixer whose k/v heads repeat in groups, and its cache is
    that mixer's cache with every group's copies folded into one."""
    H, Hkv, Dh, d = 4, 2, 8, 24
    m = _mixer(d, H, Dh, window=W, prefix=P, mem=M, rope=True, qk_norm=True)
    group = torch.arange(H) // (H // Hkv)
    with torch.no_grad():  # query head h's k/v projections and memory kv = those of its kv head
        for part in (1, 2):
            for t in (m.qkv_proj.weight, m.qkv_proj.bias):
                heads = t[part * H * Dh:(part + 1) * H * Dh].view(H, Dh, -1)
                heads.copy_(heads[group * (H // Hkv)])
        for t in (m.mem_k, m.mem_v):
            t.copy_(t[:, group * (H // Hkv)])
    full = m.step_spec()
    keep = torch.arange(Hkv) * (H // Hkv)
    kv_rows = [((part * H + keep[:, None]) * Dh + torch.arange(Dh)).flatten() for part in (1, 2)]
    qkv_rows = torch.cat([torch.arange(H * Dh), *kv_rows])
    w = full.weights._replace(
        qkv_weight=full.weights.qkv_weight[qkv_rows], qkv_bias=full.weights.qkv_bias[qkv_rows],
        mem_k=full.weights.mem_k[:, keep].contiguous(), mem_v=full.weights.mem_v[:, keep].contiguous(),
    )
    spec = MixerStep("attention", w, (H, Hkv, *full.ints[2:]), full.floats)
    ref = m.init_state(2)
    gqa = AttentionState(ref.k[:, keep].clone(), ref.v[:, keep].clone(), ref.pos.clone())
    for t in range(P + 2 * W + 1):
        x = torch.randn(2, d)
        with torch.no_grad():
            y_ref, _ = m(x[:, None], ref, inplace=True)
        y = mixer_step(spec, x, list(gqa), gqa.pos.clone())
        assert_close(y, y_ref[:, 0], msg=f"step {t}")
        assert_tree_close(gqa, AttentionState(ref.k[:, keep], ref.v[:, keep], ref.pos), msg=f"step {t}")


@pytest.mark.parametrize("meta_tokens", ["sequence", "kv"])
def test_hymba_attention_layers(meta_tokens):
    """Hymba's attention layers (global and sliding) from its init_state: the meta tokens already in
    the prefix slots ("sequence") or as memory kv ("kv")."""
    model = hs.build("hymba", embed_dim=5, hidden_size=32, num_layers=2, num_heads=2,
                     window_size=W, global_layers=(0,), num_meta_tokens=3, meta_tokens=meta_tokens).eval()
    with torch.no_grad():
        state = model.init_state(2)
    for i, block in enumerate(model.blocks):
        ref = _clone(state.layers[i].attn)
        fused, spec = _clone(ref), block.attn.step_spec()
        for t in range(2 * W + 1):
            _step_both(block.attn, torch.randn(2, 32), ref, fused, spec, f"layer {i} step {t}")


def test_two_threads_split_heads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _stream(_mixer(64, 4, 64, rope=True, mem=M), 2, 80, 3, max_len=100)  # 8 heads, 6 per task
    finally:
        torch.set_num_threads(n)


def test_two_threads_split_a_row_between_tasks():
    """Grouped kv heads over two threads: the kernel's tasks are (row, kv head) pairs, and a thread's
    share may start at a row's second kv head (its norms, rotation and slot write are per task)."""
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # 3 rows x 2 kv heads = 6 tasks of ~100 slots: split 3 + 3, the second share mid-row
        m = _mixer(64, 4, 64, rope=True, qk_norm=True, mem=M, kv_heads=2)
        _stream(m, 3, 95, 3, max_len=100)
    finally:
        torch.set_num_threads(n)


def test_step_reads_live_parameters():
    """The spec holds the parameters themselves: writes through .data and load_state_dict are seen
    by the next step without asking for a new spec."""
    m = _mixer(window=W, prefix=P, mem=M, rope=True, qk_norm=True)
    spec = m.step_spec()
    assert spec.weights.qkv_weight is m.qkv_proj.weight and spec.weights.mem_v is m.mem_v
    ref = m.init_state(2)
    fused = _clone(ref)
    _step_both(m, torch.randn(2, 24), ref, fused, spec)
    m.o_proj.weight.data.mul_(2)
    m.k_norm.bias.data.add_(1)
    _step_both(m, torch.randn(2, 24), ref, fused, spec, "after .data writes")
    m.load_state_dict(_mixer(window=W, prefix=P, mem=M, rope=True, qk_norm=True).state_dict())
    _step_both(m, torch.randn(2, 24), ref, fused, spec, "after load_state_dict")


def test_step_spec_declines_what_the_kernel_does_not_cover():
    assert _mixer().step_spec().kind == "attention"
    assert _mixer(dtype=torch.bfloat16).step_spec() is None


def _unchanged_after_error(spec, x, state, match):
    before = _clone(state)
    with pytest.raises(RuntimeError, match=match):
        mixer_step(spec, x, list(state), state.pos.clone())
    assert_tree_close(state, before, msg="a refused step changed the state")


def test_bad_sizes_raise_without_writing():
    m = _mixer(mem=M, rope=True)
    spec, x = m.step_spec(), torch.randn(2, 24)
    st = m.init_state(2, max_len=5)
    st.pos.copy_(torch.tensor([3, 7]))  # row 1 past the last slot (P + max_len = 5)
    _unchanged_after_error(spec, x, st, "row 1 is at position 7")
    st.pos.copy_(torch.tensor([-1, 0]))
    _unchanged_after_error(spec, x, st, "row 0 is at position -1")
    good = m.init_state(2, max_len=5)
    narrow = AttentionState(good.k[..., :4].contiguous(), good.v[..., :4].contiguous(), good.pos)
    _unchanged_after_error(spec, x, narrow, "caches k")
    wide = AttentionState(good.k.double(), good.v.double(), good.pos)
    _unchanged_after_error(spec, x, wide, "caches must be")
    _unchanged_after_error(spec._replace(ints=(4, 2, *spec.ints[2:])), x, good, "qkv weight")
    _unchanged_after_error(spec._replace(ints=spec.ints[:-1]), x, good, "expected 10 weights, 6 ints")
    _unchanged_after_error(spec._replace(weights=spec.weights._replace(mem_v=None)), x, good, "memory keys")
    _unchanged_after_error(spec, torch.randn(2, 23), good, "linear of input")
    ring = _mixer(window=W, prefix=P).step_spec()
    _unchanged_after_error(ring._replace(ints=(*ring.ints[:3], W + 1, *ring.ints[4:])), x,
                           _mixer(window=W, prefix=P).init_state(2), "cache slots do not fit")


@pytest.mark.parametrize("Dh", [40, 64, 72, 100])
def test_wide_heads_every_value_strip(Dh):
    """The weighted sum over the values keeps a strip of up to 8 SIMD vectors of the output in
    registers: one strip of 5 vectors (40 fp32), one full strip (64), a full strip then a 1-vector
    rest (72) and then a partial 5-vector rest (100); float64 halves the vector, so 40 takes two
    strips there."""
    _stream(_mixer(2 * Dh, 2, Dh, prefix=P, mem=M, rope=True), 2, 9, 6)
    _stream(_mixer(2 * Dh, 2, Dh, window=W, mem=M, dtype=torch.float64), 1, 3, 6)


@pytest.mark.parametrize("Dh,kv_heads,dtype", [(64, None, torch.float32), (10, 1, torch.float32),
                                               (40, 2, torch.float64)])
def test_a_row_does_not_depend_on_its_neighbours(Dh, kv_heads, dtype):
    """A thread's (row, kv head) tasks run as a pipeline: each turn scores one task's keys while it sums
    the previous task's values (one value strip: 64 and 10 fp32; 40 fp64 is two strips and reads them
    one after the other). A row's output and cache are the same bits whatever its neighbours attend:
    the rows around row 2 change their positions (so spans, and which turn pairs with which) and their
    cached values, row 2 keeps its own."""
    B, row = 5, 2
    m = _mixer(4 * Dh, 4, Dh, mem=M, rope=True, qk_norm=True, kv_heads=kv_heads, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4 * Dh, generator=g).to(dtype)
    spec, outs, caches = m.step_spec(), [], []
    for _ in range(3):
        st = m.init_state(B, max_len=40)
        st.k.normal_(generator=g)
        st.v.normal_(generator=g)
        st.pos.copy_(torch.randint(0, 40, (B,), generator=g))
        st.pos[row] = 29
        torch.manual_seed(1)  # row 2's cache: the same values each trial
        st.k[row].normal_()
        st.v[row].normal_()
        outs.append(mixer_step(spec, x, list(st), st.pos.clone())[row])
        caches.append((st.k[row], st.v[row]))
    for out, (k, v) in zip(outs[1:], caches[1:]):
        assert_bitwise(out, outs[0], "row 2's output depends on the other rows")
        assert_bitwise(k, caches[0][0], "row 2's keys depend on the other rows")
        assert_bitwise(v, caches[0][1], "row 2's values depend on the other rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pipelined_rows_equal_each_row_alone(dtype):
    """Above 4 rows a thread's tasks run as a pipeline (keys of one task in the loop of the previous
    task's values); at 4 rows or fewer one pass after the other. 6 rows stepped together equal each
    row stepped alone (within rounding: the q/k/v projections of 6 rows and of one sum in different
    orders; the attention arithmetic is the same)."""
    B = 6
    m = _mixer(4 * 64, 4, 64, mem=M, rope=True, qk_norm=True, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4 * 64, generator=g).to(dtype)
    st = m.init_state(B, max_len=48)
    st.k.normal_(generator=g)
    st.v.normal_(generator=g)
    st.pos.copy_(torch.randint(0, 48, (B,), generator=g))
    alone = [AttentionState(st.k[b : b + 1].clone(), st.v[b : b + 1].clone(), st.pos[b : b + 1].clone())
             for b in range(B)]
    spec = m.step_spec()
    together = mixer_step(spec, x, list(st), st.pos.clone())
    cls = "fp64" if dtype == torch.float64 else "fp32"
    for b in range(B):
        one = mixer_step(spec, x[b : b + 1], list(alone[b]), alone[b].pos.clone())
        assert_close(together[b : b + 1], one, cls, f"row {b}")
        assert_close(st.k[b : b + 1], alone[b].k, cls, f"row {b} keys")
        assert_close(st.v[b : b + 1], alone[b].v, cls, f"row {b} values")
