"""The fused steps of the recurrent backbone mixers (gru, rwkv, delta_net, gated_delta_net,
griffin_lru) against each mixer's own ``forward`` at T = 1, from a prefilled state, over several steps.

Each case checks the output and every state field the kernel updates in place, at batch 1 (the gemv
branch of the projections) and batch 8 (the GEMM branch), with rows at different positions (one row
reset to its initial state next to rows prefilled to different lengths), on widths that are not
multiples of the SIMD width.
"""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from hybridssm.mixers.delta_net import DeltaNetMixer
from hybridssm.mixers.gated_delta_net import GatedDeltaNetMixer
from hybridssm.mixers.gru import GRUMixer
from hybridssm.mixers.rglru import RGLRUMixer
from hybridssm.mixers.rwkv import RWKVMixer
from hybridssm.ops.step import mixer_step

STEPS = 3


def _perturbed(mixer: torch.nn.Module) -> torch.nn.Module:
    """Random parameters everywhere: several inits are zero (RWKV's output projections, LoRA
    factors), which would let a wrong kernel pass."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mixer.eval()


def _prefilled(mixer, B: int, d: int, dtype: torch.dtype = torch.float32):
    """A state after a prefill of random lengths (1..6) per row, with row 0 reset to the initial
    state (position 0) when B > 1; and each row's position."""
    T = 6
    lengths = torch.randint(1, T + 1, (B,))
    with torch.no_grad():
        _, state = mixer(torch.randn(B, T, d, dtype=dtype), mixer.init_state(B), lengths=lengths)
    pos = lengths.clone()
    if B > 1:
        fresh = mixer.init_state(1)
        for s, f in zip(state, fresh):
            s[0] = f[0]
        pos[0] = 0
    return state, pos


def check_step_matches_forward(mixer, d: int, B: int, dtype: torch.dtype = torch.float32) -> None:
    mixer = _perturbed(mixer).to(dtype)
    spec = mixer.step_spec()
    assert spec is not None
    ref_state, pos = _prefilled(mixer, B, d, dtype)
    state = [s.clone().contiguous() for s in ref_state]
    for t in range(STEPS):
        x = torch.randn(B, d, dtype=dtype)
        with torch.no_grad():
            y_ref, ref_state = mixer(x[:, None], ref_state, inplace=True)
        y = mixer_step(spec, x, state, pos)
        pos += 1
        assert_close(y, y_ref[:, 0], msg=f"output at step {t}")
        for name, s, r in zip(type(ref_state)._fields, state, ref_state):
            if r.is_floating_point():
                assert_close(s, r, msg=f"state {name} at step {t}")
            else:
                assert torch.equal(s, r), f"state {name} at step {t}: {s} != {r}"


GRIFFIN = [  # (hidden, options): odd widths, several gate block counts, conv widths 1..4
    (37, {}),
    (36, {"lru_width": 36, "gate_heads": 3, "conv_size": 3}),
    (20, {"lru_width": 45, "gate_heads": 5, "conv_size": 1}),
    (64, {"gate_heads": 2}),
]


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("d, options", GRIFFIN)
def test_griffin_step_equals_forward(d, options, B):
    check_step_matches_forward(RGLRUMixer(d, **options), d, B)


def test_griffin_step_applies_first_position_rule_per_row():
    # a row at position 0 and one at position 5 in one batch: only the first gets a = 0
    mixer = _perturbed(RGLRUMixer(19, gate_heads=1))
    state = mixer.init_state(2)
    with torch.no_grad():
        _, state = mixer(torch.randn(2, 5, 19), state)
    fresh = mixer.init_state(1)
    for s, f in zip(state, fresh):
        s[0] = f[0]
    assert state.pos.tolist() == [0, 5]
    ours = [s.clone() for s in state]
    x = torch.randn(2, 19)
    with torch.no_grad():
        y_ref, state = mixer(x[:, None], state)
    y = mixer_step(mixer.step_spec(), x, ours, torch.tensor([0, 5]))
    assert_close(y, y_ref[:, 0])
    assert_close(ours[1], state.h)
    assert ours[2].tolist() == [1, 6]


def _bad_calls(mixer, d: int):
    """(description, call) pairs that must raise RuntimeError before touching memory."""
    spec = mixer.step_spec()
    good = [s.contiguous() for s in mixer.init_state(2)]
    pos = torch.zeros(2, dtype=torch.int64)
    x = torch.randn(2, d)
    yield "input width", lambda: mixer_step(spec, torch.randn(2, d + 1), good, pos)
    for i, s in enumerate(good):
        bad = list(good)
        bad[i] = s.new_zeros(2, *[n + 1 for n in s.shape[1:]]) if s.dim() > 1 else s.new_zeros(3)
        yield f"state {i} shape", lambda bad=bad: mixer_step(spec, x, bad, pos)
    for i, w in enumerate(spec.weights):
        if w is None:
            continue
        ws = list(spec.weights)
        ws[i] = torch.zeros(*[n + 1 for n in w.shape])
        bad_spec = spec._replace(weights=type(spec.weights)(*ws))
        yield f"weight {type(spec.weights)._fields[i]} shape", lambda s=bad_spec: mixer_step(s, x, good, pos)
    yield "integer input", lambda: mixer_step(spec, x.long(), good, pos)


def check_bad_sizes_raise(mixer, d: int) -> None:
    for what, call in _bad_calls(mixer, d):
        with pytest.raises(RuntimeError):
            call()
            pytest.fail(f"no error for a wrong {what}")


def test_griffin_step_rejects_wrong_sizes():
    check_bad_sizes_raise(RGLRUMixer(20, gate_heads=2), 20)


RWKV = [  # (hidden, options): odd widths and head counts, ranks and channel widths off the SIMD width
    (36, {"head_dim": 12, "mix_lora_rank": 5, "decay_lora_rank": 7, "ffn_size": 45}),
    (21, {"head_dim": 7}),
    (64, {"head_dim": 16, "mix_lora_rank": 8, "decay_lora_rank": 16}),
    # heads wider than the 4 vectors of columns the WKV update keeps in registers, with a tail
    (90, {"head_dim": 45, "mix_lora_rank": 6, "decay_lora_rank": 9, "ffn_size": 70}),
]


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("d, options", RWKV)
def test_rwkv_step_equals_forward(d, options, B):
    check_step_matches_forward(RWKVMixer(d, **options), d, B)


def test_rwkv_step_rejects_wrong_sizes():
    check_bad_sizes_raise(RWKVMixer(20, head_dim=5, mix_lora_rank=3, decay_lora_rank=4), 20)


DELTA = [  # (hidden, options): odd head widths, several head counts, value expansion, conv widths
    (30, {"num_heads": 3, "conv_size": 4}),
    (21, {"num_heads": 1, "conv_size": 2, "expand_v": 2}),
    (40, {"num_heads": 4, "head_dim": 9, "conv_size": 1, "allow_neg_eigval": True}),
    # the kernel's column blocks (8 SIMD vectors, 64 floats with AVX2): one full block (Vh 64, the
    # benchmarks' heads), 8 vectors with a partial last (Vh 60), a block and a 1-vector rest (Vh 70),
    # two blocks (the second not prefetched) and a 3-vector rest (Vh 150); narrower rests above and
    # here: 4 vectors with a partial last (Vh 30), 5 (Vh 40), 6 (Vh 42 above), 2 (Vh 9 above).
    # The 4-tap conv's 8-channel path with and without a scalar tail: q/k/v widths 128, 60, 70, 150.
    (128, {"num_heads": 2}),
    (60, {"num_heads": 1}),
    (70, {"num_heads": 1}),
    (75, {"num_heads": 1, "expand_v": 2}),
    (30, {"num_heads": 1}),
    (40, {"num_heads": 2, "expand_v": 2}),
]


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("d, options", DELTA)
@pytest.mark.parametrize("cls", [DeltaNetMixer, GatedDeltaNetMixer])
def test_delta_rule_step_equals_forward(cls, d, options, B):
    check_step_matches_forward(cls(d, **options), d, B)


@pytest.mark.parametrize("cls", [DeltaNetMixer, GatedDeltaNetMixer])
def test_delta_rule_step_rejects_wrong_sizes(cls):
    check_bad_sizes_raise(cls(24, num_heads=2, head_dim=5), 24)


def test_delta_rule_step_rejects_a_spec_of_the_other_kind():
    gated = GatedDeltaNetMixer(16, num_heads=2).step_spec()
    plain = DeltaNetMixer(16, num_heads=2)
    state = [s.contiguous() for s in plain.init_state(1)]
    pos = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError):
        mixer_step(gated._replace(kind="delta_net"), torch.randn(1, 16), state, pos)


# B = 7 and 8 leave 1 and 2 rows after the many-streams GEMM's blocks of 3 (6 on AVX-512); d = 37
# leaves a tail of inputs and 3 of 111 gate rows; B = 300 takes MKL's GEMM (beyond the blocked
# kernel's 256 rows).
@pytest.mark.parametrize("B", [1, 7, 8, 300])
@pytest.mark.parametrize("d", [1, 13, 37, 40])
def test_gru_step_equals_forward(d, B):
    check_step_matches_forward(GRUMixer(d), d, B)


def test_gru_step_rejects_wrong_sizes():
    check_bad_sizes_raise(GRUMixer(12), 12)


SMALL = {  # one small configuration of each kind
    "griffin_lru": lambda: RGLRUMixer(20, gate_heads=2),
    "rwkv": lambda: RWKVMixer(20, head_dim=5, mix_lora_rank=3, decay_lora_rank=4),
    "delta_net": lambda: DeltaNetMixer(20, num_heads=2),
    "gated_delta_net": lambda: GatedDeltaNetMixer(20, num_heads=2),
    "gru": lambda: GRUMixer(20),
}


@pytest.mark.parametrize("B", [2, 8])
@pytest.mark.parametrize("kind", sorted(SMALL))
def test_step_equals_forward_in_float64(kind, B):
    check_step_matches_forward(SMALL[kind](), 20, B, torch.float64)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_step_reads_the_current_weights(kind):
    # a spec taken once keeps seeing the parameters after .data writes and load_state_dict
    mixer = _perturbed(SMALL[kind]())
    spec = mixer.step_spec()
    assert spec.kind == kind
    other = _perturbed(SMALL[kind]())
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    mixer.load_state_dict(other.state_dict())
    with torch.no_grad():
        next(mixer.parameters()).data.mul_(0.5)
    state, pos = _prefilled(mixer, 2, 20)
    ours = [s.clone() for s in state]
    x = torch.randn(2, 20)
    with torch.no_grad():
        y_ref, _ = mixer(x[:, None], state)
    assert_close(mixer_step(spec, x, ours, pos), y_ref[:, 0])
