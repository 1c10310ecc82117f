"""Causal attention: the op's fast forms against the reference, the streaming form, the mixer's
step == forward contract, and the ``transformer`` model's options."""

from __future__ import annotations

import pytest
import torch

import hybridssm as hs
from helpers import assert_close, assert_tree_close
from hybridssm.mixers.attention import AttentionMixer
from hybridssm.ops._kernels import use_kernels
from hybridssm.ops.attention import (
    IMPLS,
    attention,
    attention_cached,
    attention_cached_ref,
    attention_cached_torch,
    attention_ref,
    attention_torch,
)

W, CHUNK, P, M = 5, 8, 3, 2
LENGTHS = [1, 7, 63, 200, W, W + 1]


def qkv(B, T, H=2, D=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def memory(H=2, D=8, n=M, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, H, D, generator=g, dtype=dtype).requires_grad_() for _ in range(2)]


def grads(out, inputs, seed=2):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, w)


# -- op: fast forms == reference, values and every gradient ---------------------------------------
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("window", [None, W])
@pytest.mark.parametrize("num_prefix", [0, P])
@pytest.mark.parametrize("num_mem", [0, M])
def test_fast_forms_match_reference(T, window, num_prefix, num_mem):
    q, k, v = qkv(2, T)
    mk, mv = memory() if num_mem else (None, None)
    inputs = [q, k, v] + ([mk, mv] if num_mem else [])
    opts = dict(window=window, num_prefix=num_prefix, mem_k=mk, mem_v=mv)
    ref = attention_ref(q, k, v, **opts)
    gref = grads(ref, inputs)
    for impl in IMPLS:
        out = attention_torch(q, k, v, impl=impl, chunk_size=CHUNK, **opts)
        assert out.shape == q.shape
        assert_close(out, ref, msg=f"{impl}: output")
        for i, (a, b) in enumerate(zip(grads(out, inputs), gref)):
            assert_close(a, b, msg=f"{impl}: gradient of input {i}")


def test_dispatcher_backends():
    q, k, v = qkv(1, 9)
    ref = attention_ref(q, k, v, window=3)
    with use_kernels("ref"):
        assert_close(attention(q, k, v, window=3, impl="chunked"), ref)
    with use_kernels("torch"):
        assert_close(attention(q, k, v, window=3, impl="memory_efficient", chunk_size=2), ref)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="flash")


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_fp64(impl):
    q, k, v = qkv(1, 7, H=1, D=3, dtype=torch.float64)
    mk, mv = memory(H=1, D=3, n=1, dtype=torch.float64)

    def fn(q, k, v, mk, mv):
        return attention_torch(q, k, v, window=3, num_prefix=1, mem_k=mk, mem_v=mv, impl=impl,
                               chunk_size=2)

    # the custom backward of memory_efficient gets the full (slow-mode) check
    assert torch.autograd.gradcheck(fn, (q, k, v, mk, mv), fast_mode=impl != "memory_efficient")

    def full(q, k, v):
        return attention_torch(q, k, v, impl=impl, chunk_size=3)

    assert torch.autograd.gradcheck(full, (q, k, v), fast_mode=True)


def _saved_numel(fn) -> int:
    """The largest tensor autograd saves while running ``fn``."""
    biggest = [0]

    def pack(t):
        biggest[0] = max(biggest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return biggest[0]


@pytest.mark.parametrize("impl", IMPLS)
def test_sliding_window_memory_is_linear_in_T(impl):
    """DESIGN §5: O(T * W) with a window (never a dense T x T), O(T) for memory_efficient."""
    T, H, D = 512, 2, 8
    q, k, v = qkv(1, T, H=H, D=D)
    band = T * H * (CHUNK + W + P + 8)  # scores of one query block against its band + globals
    saved = _saved_numel(lambda: attention_torch(q, k, v, window=W, num_prefix=P, impl=impl,
                                                 chunk_size=CHUNK))
    assert saved <= band, f"{impl} saved a tensor of {saved} elements (band bound {band})"
    if impl == "memory_efficient":
        saved = _saved_numel(lambda: attention_torch(q, k, v, impl=impl, chunk_size=64))
        assert saved <= T * H * D, f"memory_efficient saved {saved} elements, not O(T)"


# -- the window boundary: a key exactly W back is invisible, W - 1 back visible --------------------
def _influence(run, T, src):
    """Whether changing value ``src`` changes the output at the last position ``T - 1``."""
    q, k, v = qkv(1, T)
    with torch.no_grad():
        base = run(q, k, v)
        v2 = v.clone()
        v2[:, src] += 1.0
        other = run(q, k, v2)
    return not torch.equal(base[:, T - 1], other[:, T - 1])


def _step_runner(window, num_prefix=0):
    def run(q, k, v):
        B, T, H, D = q.shape
        ck = torch.zeros(B, H, num_prefix + (window or T), D)
        cv, pos, outs = torch.zeros_like(ck), torch.zeros(B, dtype=torch.long), []
        for t in range(T):
            o, (ck, cv, pos) = attention_cached(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1],
                                                ck, cv, pos, window=window, num_prefix=num_prefix)
            outs.append(o)
        return torch.cat(outs, 1)

    return run


def test_window_boundary_forward_and_step():
    T = 12
    runners = {impl: (lambda q, k, v, impl=impl: attention_torch(q, k, v, window=W, impl=impl,
                                                                   chunk_size=4)) for impl in IMPLS}
    runners["ref"] = lambda q, k, v: attention_ref(q, k, v, window=W)
    runners["step"] = _step_runner(W)
    for name, run in runners.items():
        assert not _influence(run, T, T - 1 - W), f"{name}: a key W steps back is visible"
        assert _influence(run, T, T - W), f"{name}: a key W - 1 steps back is invisible"
    # prefix keys stay visible at any distance
    for name, run in {
        "sdpa": lambda q, k, v: attention_torch(q, k, v, window=W, num_prefix=2, chunk_size=4),
        "step": _step_runner(W, num_prefix=2),
    }.items():
        assert _influence(run, T, 1), f"{name}: a prefix key is hidden"
        assert not _influence(run, T, 2), f"{name}: the first non-prefix key is visible"


# -- op: the cached form ---------------------------------------------------------------------------
def _cache(B, H, D, N, dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_() for _ in range(2)]


@pytest.mark.parametrize("window", [None, W])
@pytest.mark.parametrize("num_prefix", [0, P])
@pytest.mark.parametrize("T", [1, 7, 63])
def test_cached_form_matches_reference_with_gradients(window, num_prefix, T, monkeypatch):
    """From a filled cache with rows at different positions, with lengths and memory keys: the fast
    form (long chunks in pieces) equals the reference on outputs, the new cache and every gradient
    (the cache's too)."""
    monkeypatch.setattr("hybridssm.ops.attention._FULL_PIECE", 16)
    B, H, D = 3, 2, 8
    N = num_prefix + (window or 80)
    q, k, v = qkv(B, T, H=H, D=D)
    ck, cv = _cache(B, H, D, N)
    mk, mv = memory(H=H, D=D)
    pos = torch.tensor([0, 2, 9])
    lengths = torch.tensor([T, max(1, T - 3), max(1, T // 2)])
    opts = dict(window=window, num_prefix=num_prefix, lengths=lengths, mem_k=mk, mem_v=mv)
    inputs = [q, k, v, ck, cv, mk, mv]
    out_r, (k_r, v_r, p_r) = attention_cached_ref(q, k, v, ck, cv, pos, **opts)
    out_f, (k_f, v_f, p_f) = attention_cached_torch(q, k, v, ck, cv, pos, **opts)
    valid = (torch.arange(T) < lengths[:, None]).view(B, T, 1, 1)  # padded outputs: unspecified
    out_r, out_f = out_r * valid, out_f * valid
    assert_close(out_f, out_r, msg="output")
    assert_close(k_f, k_r, msg="cache k")
    assert_close(v_f, v_r, msg="cache v")
    assert torch.equal(p_f, pos + lengths) and torch.equal(p_r, pos + lengths)
    loss_r = torch.cat([out_r.flatten(), k_r.flatten(), v_r.flatten()])
    loss_f = torch.cat([out_f.flatten(), k_f.flatten(), v_f.flatten()])
    for i, (a, b) in enumerate(zip(grads(loss_f, inputs), grads(loss_r, inputs))):
        assert_close(a, b, msg=f"gradient of input {i}")


@pytest.mark.parametrize("window", [None, W])
def test_cached_chunks_equal_training_form(window, monkeypatch):
    """Any split of a stream into cached chunks (long ones too: they are fed in pieces) equals
    the training form, and the inplace writes equal the functional ones."""
    monkeypatch.setattr("hybridssm.ops.attention._FULL_PIECE", 32)
    T, B, H, D = 90, 2, 2, 8
    q, k, v = qkv(B, T, H=H, D=D)
    mk, mv = memory(H=H, D=D)
    ref = attention_ref(q, k, v, window=window, num_prefix=P, mem_k=mk, mem_v=mv)
    for splits in ([1] * 9 + [81], [P, 40, 47], [T]):
        for inplace in (False, True):
            N = P + (window or T)
            ck, cv = torch.zeros(B, H, N, D), torch.zeros(B, H, N, D)
            pos, outs, a = torch.zeros(B, dtype=torch.long), [], 0
            with torch.no_grad():
                for n in splits:
                    sl = slice(a, a + n)
                    o, (ck2, cv2, pos) = attention_cached(q[:, sl], k[:, sl], v[:, sl], ck, cv, pos,
                                                          window=window, num_prefix=P, mem_k=mk,
                                                          mem_v=mv, inplace=inplace)
                    assert (ck2 is ck) == inplace
                    ck, cv, a = ck2, cv2, a + n
                    outs.append(o)
            assert_close(torch.cat(outs, 1), ref, msg=f"splits {splits[:3]}..., inplace={inplace}")


# -- the mixer -------------------------------------------------------------------------------------
MIXER_CONFIGS = {
    "full": dict(),
    "full-rope-qknorm": dict(positional="rope", qk_layernorm=True),
    "sliding": dict(window_size=4),
    "sliding-rope-prefix": dict(window_size=4, positional="rope", num_prefix=2),
    "full-prefix-memory": dict(num_prefix=2, num_memory_kv=3, impl="chunked"),
    "sliding-memory-me": dict(window_size=4, num_memory_kv=2, impl="memory_efficient",
                              qk_layernorm=True),
}


def make_mixer(**opts):
    torch.manual_seed(5)
    return AttentionMixer(16, 2, 8, chunk_size=4, **opts)


def x_in(B, T, seed=6):
    return torch.randn(B, T, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MIXER_CONFIGS))
@torch.no_grad()
def test_mixer_step_equals_forward(name):
    mixer = make_mixer(**MIXER_CONFIGS[name])
    T = 11  # crosses W = 4 and W + 1, and two chunks
    x = x_in(2, T)
    y_train, none = mixer(x)
    assert none is None
    y_fwd, s_fwd = mixer(x, mixer.init_state(2, max_len=16))
    assert_close(y_fwd, y_train, msg="cached forward vs training forward")
    for inplace in (False, True):
        s, ys = mixer.init_state(2, max_len=16), []
        for t in range(T):
            before = [b.clone() for b in s]
            y, s_new = mixer(x[:, t : t + 1], s, inplace=inplace)
            if inplace:
                assert all(a is b for a, b in zip(s_new, s))
            else:
                assert_tree_close(list(s), before, msg="functional step modified its state")
            s = s_new
            ys.append(y)
        assert_close(torch.cat(ys, 1), y_train, msg=f"step vs forward (inplace={inplace})")
        assert_tree_close(s, s_fwd, msg=f"stepped state vs forward state (inplace={inplace})")


@pytest.mark.parametrize("name", list(MIXER_CONFIGS))
@torch.no_grad()
def test_mixer_chunked_prefill(name):
    mixer = make_mixer(**MIXER_CONFIGS[name])
    x = x_in(2, 45)
    y_train, _ = mixer(x)
    s, ys = mixer.init_state(2, max_len=64), []
    for a, b in ((0, 3), (3, 4), (4, 9), (9, 45)):  # T = 1, W + 1 and a long chunk
        y, s = mixer(x[:, a:b], s)
        ys.append(y)
    assert_close(torch.cat(ys, 1), y_train)
    assert torch.equal(s.pos, torch.tensor([45, 45]))


@pytest.mark.parametrize("name", ["full", "sliding-rope-prefix", "full-prefix-memory"])
@torch.no_grad()
def test_mixer_lengths(name):
    mixer = make_mixer(**MIXER_CONFIGS[name])
    T, lengths = 9, torch.tensor([9, 3, 6])
    x = x_in(3, T)
    s0 = mixer.init_state(3, max_len=20)
    _, s0 = mixer(x_in(3, 2, seed=9), s0)  # rows start from a state
    y, s = mixer(x, s0, lengths=lengths)
    x_next = x_in(3, 4, seed=10)
    y_next, _ = mixer(x_next, s)
    for b in range(3):
        L = int(lengths[b])
        row0 = type(s0)(*(t[b : b + 1] for t in s0))
        y_b, s_b = mixer(x[b : b + 1, :L], row0)
        assert_close(y[b : b + 1, :L], y_b, msg=f"row {b} output")
        assert_tree_close(type(s)(*(t[b : b + 1] for t in s)), s_b, msg=f"row {b} state")
        assert_close(y_next[b : b + 1], mixer(x_next[b : b + 1], s_b)[0], msg=f"row {b} continued")


def test_mixer_capacity_error():
    mixer = make_mixer()
    s = mixer.init_state(1, max_len=3)
    assert mixer.state_max_len(s) == 3
    with pytest.raises(ValueError, match=r"max_len=3.*init_state\(max_len=.*sliding window"):
        mixer(x_in(1, 4), s)
    _, s = mixer(x_in(1, 3), s)
    with pytest.raises(ValueError, match="max_len=3"):
        mixer(x_in(1, 1), s)
    ring = make_mixer(window_size=4)
    s = ring.init_state(1, max_len=3)  # a ring has no capacity limit
    assert ring.state_max_len(s) is None and s.k.shape[2] == 4
    ring(x_in(1, 50), s)


def test_mixer_cached_path_is_differentiable():
    """Truncated BPTT: forward(x[:a]) -> forward(x[a:], state) has the gradients of forward(x)."""
    for name in ("full-rope-qknorm", "sliding-rope-prefix", "full-prefix-memory"):
        mixer = make_mixer(**MIXER_CONFIGS[name])
        x = x_in(2, 13).requires_grad_()
        params = [x] + list(mixer.parameters())
        y_full, _ = mixer(x)
        y1, s = mixer(x[:, :6], mixer.init_state(2, max_len=16))
        y2, _ = mixer(x[:, 6:], s)
        g_full, g_split = grads(y_full, params), grads(torch.cat([y1, y2], 1), params)
        for i, (a, b) in enumerate(zip(g_split, g_full)):
            assert_close(a, b, msg=f"{name}: gradient {i}")


def test_mixer_bad_options():
    with pytest.raises(ValueError, match="positional"):
        make_mixer(positional="sinusoidal")
    with pytest.raises(ValueError, match="impl"):
        make_mixer(impl="flash")
    with pytest.raises(ValueError, match="window_size"):
        make_mixer(window_size=0)


def test_mixer_bf16_autocast_close_to_fp32():
    mixer = make_mixer(window_size=4, positional="rope")
    x = x_in(2, 11)
    with torch.no_grad():
        y32, _ = mixer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16, _ = mixer(x)
            ys, _ = mixer(x, mixer.init_state(2))
    assert torch.isfinite(y16).all()
    assert_close(y16.float(), y32, cls="bf16")
    assert_close(ys.float(), y32, cls="bf16")


# -- the transformer model -------------------------------------------------------------------------
def test_transformer_defaults_and_head_dim_rule():
    cfg = hs.TransformerConfig(embed_dim=8)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.attn_head_dim) == (256, 4, 4, 64)
    assert cfg.positional == "rope" and cfg.dropout == 0.0 and not cfg.use_sliding_window
    assert hs.TransformerConfig(embed_dim=8, hidden_size=32).attn_head_dim == 8
    assert hs.TransformerConfig(embed_dim=8, hidden_size=1024).attn_head_dim == 64
    assert hs.TransformerConfig(embed_dim=8, hidden_size=2, num_heads=4).attn_head_dim == 1
    assert hs.TransformerConfig(embed_dim=8, hidden_size=32, head_dim=48).attn_head_dim == 48
    assert hs.recommended_defaults("transformer")["head_dim"] == 64
    model = hs.build("transformer", embed_dim=8, hidden_size=32, num_layers=1)
    assert model.output_size == 32
    assert hs.param_count("transformer", embed_dim=8, hidden_size=32, num_layers=1) == sum(
        p.numel() for p in model.parameters()
    )


@pytest.mark.parametrize(
    "opts, name",
    [
        (dict(num_heads=0), "num_heads"),
        (dict(head_dim=0), "head_dim"),
        (dict(positional="absolute"), "positional"),
        (dict(max_positions=0), "max_positions"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(use_sliding_window=1), "use_sliding_window"),
    ],
)
def test_transformer_bad_options(opts, name):
    with pytest.raises(ValueError, match=name):
        hs.TransformerConfig(embed_dim=8, **opts)


@pytest.mark.parametrize(
    "flags, impl",
    [
        (dict(), "sdpa"),
        (dict(chunked_attention=True), "chunked"),
        (dict(memory_efficient_attention=True), "memory_efficient"),
    ],
)
def test_transformer_impl_flags(flags, impl):
    model = hs.build("transformer", embed_dim=4, hidden_size=16, num_heads=2, num_layers=1,
                     use_sliding_window=True, window_size=3, **flags)
    mixer = model.blocks[0].mixer
    assert mixer.impl == impl and mixer.window_size == 3


def test_transformer_attention_flags_are_exclusive():
    # one rule for every model (the hybrid's too): both flags set is an error, not a silent choice
    with pytest.raises(ValueError, match="'memory_efficient_attention' are exclusive"):
        hs.build("transformer", embed_dim=4, chunked_attention=True, memory_efficient_attention=True)


@pytest.mark.parametrize("positional", ["none", "sinusoidal", "rope", "learned"])
@torch.no_grad()
def test_transformer_positional_streaming(positional):
    torch.manual_seed(0)
    model = hs.build("transformer", embed_dim=4, hidden_size=16, num_heads=2, num_layers=2,
                     positional=positional, use_sliding_window=True, window_size=3,
                     max_positions=32).eval()
    x = torch.randn(2, 9, 4)
    full = model(x, return_sequence=True)
    s, ys = model.init_state(2), []
    for t in range(9):
        y, s = model.step(x[:, t], s)
        ys.append(y)
    assert_close(torch.stack(ys, 1), full)
    _, s = model(x[:, :4], return_state=True)
    assert_close(model(x[:, 4:], state=s, return_sequence=True), full[:, 4:])
    if positional != "none":  # the encoding really depends on the position
        shifted = model(torch.cat([x[:, :1], x], 1), return_sequence=True)[:, 1:]
        assert not torch.allclose(shifted[:, 3:], full[:, 3:])
