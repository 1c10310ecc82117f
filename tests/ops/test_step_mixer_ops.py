"""The mixers' fused steps at batch 1 without ATen ops: each kernel's intermediates live in scratch
memory (``csrc/step/scratch.h``), so one step of a mixer makes one ATen call, its output's
allocation, whatever the kind. The steps' values against each mixer's forward are
tests/streaming's; here the ops they make, the scratch memory itself, and Griffin's block-diagonal
gates (a batch-1 route of their own) against the many-row route, bit for bit."""

from __future__ import annotations

import collections
import threading

import pytest
import torch

import hybridssm as hs
from helpers import assert_close
from hybridssm.mixers.attention import AttentionMixer
from hybridssm.mixers.delta_net import DeltaNetMixer
from hybridssm.mixers.gated_delta_net import GatedDeltaNetMixer
from hybridssm.mixers.gated_ssm import GatedSSMMixer
from hybridssm.mixers.gru import GRUMixer
from hybridssm.mixers.mamba2 import Mamba2Mixer
from hybridssm.mixers.rglru import RGLRUMixer
from hybridssm.mixers.rwkv import RWKVMixer
from hybridssm.ops.step import step_extension
from hybridssm.streaming import plan_status

D = 64
MIXERS = {  # one configuration of each kind, at the models' shapes scaled down
    "attention": lambda: AttentionMixer(D, 4, 16, positional="rope", qk_layernorm=True, num_memory_kv=2),
    "attention_window": lambda: AttentionMixer(D, 4, 16, window_size=8, num_prefix=2, num_kv_heads=2),
    "delta_net": lambda: DeltaNetMixer(D, num_heads=2),
    "gated_delta_net": lambda: GatedDeltaNetMixer(D, num_heads=2),
    "gated_ssm": lambda: GatedSSMMixer(D),
    "griffin_lru": lambda: RGLRUMixer(D, gate_heads=4),
    "gru": lambda: GRUMixer(D),
    "mamba2": lambda: Mamba2Mixer(D, state_size=16, ssm_head_dim=16),
    "rwkv": lambda: RWKVMixer(D, head_dim=16, mix_lora_rank=8, decay_lora_rank=16),
}


def _ops_of_one_step(mixer, B: int) -> collections.Counter:
    """The ATen ops (by name) of one kernel call, the arguments prepared beforehand."""
    spec = mixer.step_spec()
    ext = step_extension()
    args = (spec.kind, torch.randn(B, D), spec.flat_weights(), list(spec.ints), list(spec.floats))
    states = [s.contiguous() for s in mixer.init_state(B)]
    pos = torch.zeros(B, dtype=torch.int64)
    with torch.inference_mode():
        for _ in range(2):  # first calls: one-time work (RoPE's frequencies)
            ext.mixer_step(*args, states, pos)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ext.mixer_step(*args, states, pos)
    return collections.Counter(e.name for e in prof.events())


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_batch1_step_makes_only_its_output(name):
    ops = _ops_of_one_step(MIXERS[name]().eval(), 1)
    assert ops == collections.Counter({"aten::empty": 1}), f"{name}: {dict(ops)}"


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_many_rows_allocate_only_the_output(name):
    # B > 4: the products write into the scratch buffers too (RWKV's LoRA factors through MKL's mm
    # into them: an op, no tensor of its own)
    ops = _ops_of_one_step(MIXERS[name]().eval(), 8)
    allocations = {k: n for k, n in ops.items() if "empty" in k or "zeros" in k}
    assert allocations == {"aten::empty": 1}, f"{name}: {dict(ops)}"


def test_scratch_buffers_are_disjoint_aligned_and_handed_back():
    ext = step_extension()
    sizes = [1, 63, 64, 100, 3 << 20, 5, 1 << 20, 7]  # two requests beyond a block: the arena grows
    first = ext.scratch_takes(sizes, 200)  # raises if a buffer was overwritten
    *bufs, after_inner, inner = first
    assert all(a % 64 == 0 for a in bufs)
    spans = sorted(zip(bufs, sizes))
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b, "two buffers overlap"
    assert after_inner == inner, "an ended frame's memory is taken again"
    assert inner not in bufs
    # the frame ended: the same requests get the same memory (kept by the thread, not reallocated)
    assert ext.scratch_takes(sizes, 200) == first


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("G, bw", [(4, 64), (3, 12), (5, 9), (1, 33), (2, 1)])
def test_block_diagonal_rows_alone_equal_many_rows(G, bw, dtype):
    g = torch.Generator().manual_seed(G * 100 + bw)
    u = torch.randn(9, G * bw, generator=g, dtype=dtype)
    w = torch.randn(G, bw, bw, generator=g, dtype=dtype) / bw**0.5
    bias = torch.randn(G, bw, generator=g, dtype=dtype)
    ext = step_extension()
    many = ext.block_diagonal(u, w, bias)  # B = 9: gemm_nn, 6 rows then 3
    ref = (torch.einsum("bgi,gio->bgo", u.view(9, G, bw), w) + bias).reshape(9, G * bw)
    assert_close(many, ref, "fp32" if dtype == torch.float32 else "fp64")
    for B in (1, 2, 4):  # the few-row route (vecmat over the blocks)
        assert torch.equal(ext.block_diagonal(u[:B], w, bias), many[:B]), f"B={B}"


def test_two_threads_stepping_two_models_keep_their_own_buffers():
    # the scratch arena is the thread's own: two models stepped at once from two threads (the plan's
    # run releases the GIL) give the values each gives stepped alone
    torch.manual_seed(0)
    models = [hs.build("hybrid", embed_dim=32, hidden_size=32, num_layers=3, backbone=bb, dropout=0.0).eval()
              for bb in ("rwkv", "griffin_lru")]
    assert [plan_status(m) for m in models] == ["fused", "fused"]
    xs = torch.randn(40, 1, 32)

    def run(model, out):
        with torch.inference_mode():
            state = model.init_state(1)
            out.extend(model.step(x, state, inplace=True)[0].clone() for x in xs)

    alone = [[], []]
    for m, out in zip(models, alone):
        run(m, out)
    together = [[], []]
    threads = [threading.Thread(target=run, args=(m, out)) for m, out in zip(models, together)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert len(a) == len(b) == len(xs)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
