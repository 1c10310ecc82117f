"""The fused step's kernels (ops/csrc/step): each mixer kernel against the mixer's own forward at
T = 1, and the one-call model plan over every block structure it accepts (pre/post-norm, FFN,
parallel blocks with gate or mean fusion, with or without per-path norms), at batch 1 (row gemv),
3 and 6 (GEMM), in fp32 and fp64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hybridssm as hs
from helpers import assert_close, assert_tree_close
from hybridssm.blocks import GateFusion, MeanFusion, ParallelBlock, ResidualBlock
from hybridssm.config import ModelConfig
from hybridssm.layers import FFN
from hybridssm.mixers.gated_ssm import GatedSSMMixer
from hybridssm.mixers.mamba import MambaMixer
from hybridssm.mixers.mamba2 import Mamba2Mixer
from hybridssm.models.base import SequenceModel
from hybridssm.ops.step import fused_step_kinds, mixer_step
from hybridssm.streaming import plan as plan_mod
from hybridssm.streaming import plan_status

D = 16


def _perturb(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial norms, biases, D and decays so that every weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm.weight", "norm.bias", "bias", ".D", "A_log", "dt_bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


MIXERS = {
    "mamba": lambda: MambaMixer(D, state_size=4, conv_size=4),
    "mamba2": lambda: Mamba2Mixer(D, state_size=4, conv_size=3, ssm_head_dim=8, num_groups=2),
    "gated_ssm": lambda: GatedSSMMixer(D, state_size=4, conv_size=3),
}


def test_every_kernel_of_this_package_is_registered():
    assert set(MIXERS) <= set(fused_step_kinds())


def check_kernel_equals_forward(m: nn.Module, kind: str, B: int, d: int, dtype: torch.dtype) -> None:
    """Five steps of ``m``'s fused kernel from a prefilled state against its forward at T = 1:
    the output and every state field."""
    m = m.to(dtype)
    _perturb(m)
    spec = m.step_spec()
    assert spec.kind == kind
    x = torch.randn(B, 5, d, dtype=dtype)
    with torch.no_grad():
        _, s_ref = m(torch.randn(B, 3, d, dtype=dtype))  # a non-zero starting state
        s = type(s_ref)(*(t.clone().contiguous() for t in s_ref))
        pos = torch.zeros(B, dtype=torch.long)
        for t in range(x.shape[1]):
            y_ref, s_ref = m(x[:, t : t + 1], s_ref)
            y = mixer_step(spec, x[:, t], list(s), pos)
            cls = "fp64" if dtype == torch.float64 else "fp32"
            assert_close(y, y_ref[:, 0], cls, msg=f"{kind} t={t}")
            assert_tree_close(s, s_ref, cls, msg=f"{kind} t={t} state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 3, 6])
@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_mixer_kernel_equals_the_mixers_forward(kind, B, dtype):
    torch.manual_seed(0)
    check_kernel_equals_forward(MIXERS[kind](), kind, B, D, dtype)


# Widths on and off the SIMD grid: the kernels take a SIMD width of channels (Mamba's d_inner,
# Mamba-2's head channels) and of state entries at a time, with separate paths for full and partial
# chunks, and the conv window in registers for K <= 5 and in memory beyond.
OFF_GRID = {
    "mamba N=16 K=2": ("mamba", lambda: MambaMixer(13, state_size=16, conv_size=2)),
    "mamba N=9 K=6": ("mamba", lambda: MambaMixer(13, state_size=9, conv_size=6)),
    "mamba2 P=12 N=16 K=5": ("mamba2", lambda: Mamba2Mixer(12, state_size=16, conv_size=5, ssm_head_dim=12)),
    "mamba2 P=6 N=10 K=7": ("mamba2", lambda: Mamba2Mixer(12, state_size=10, conv_size=7, ssm_head_dim=6,
                                                         num_groups=2)),
    # in_proj's input off the SIMD width (the many-streams GEMM's tails), the pool's window in memory
    "gated_ssm E=74 N=5 K=6": ("gated_ssm", lambda: GatedSSMMixer(37, state_size=5, conv_size=6)),
    # B and C held in 1, 3 or 4 registers (N a multiple of the SIMD width), and N past 4 of them
    "mamba2 P=8 N=8 K=4": ("mamba2", lambda: Mamba2Mixer(8, state_size=8, ssm_head_dim=8)),
    "mamba2 P=16 N=24 K=4": ("mamba2", lambda: Mamba2Mixer(16, state_size=24, ssm_head_dim=16, num_groups=2)),
    "mamba2 P=8 N=32 K=4": ("mamba2", lambda: Mamba2Mixer(8, state_size=32, ssm_head_dim=8)),
    "mamba2 P=8 N=40 K=4": ("mamba2", lambda: Mamba2Mixer(8, state_size=40, ssm_head_dim=8)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 6])
@pytest.mark.parametrize("case", sorted(OFF_GRID))
def test_mixer_kernel_at_widths_off_the_simd_grid(case, B, dtype):
    torch.manual_seed(1)
    kind, make = OFF_GRID[case]
    m = make()
    check_kernel_equals_forward(m, kind, B, m.in_proj.weight.shape[1], dtype)


def test_kernel_rejects_a_state_that_does_not_fit():
    m = MIXERS["mamba"]()
    s = m.init_state(2)
    with pytest.raises(RuntimeError, match="do not fit"):
        mixer_step(m.step_spec(), torch.randn(2, D), [s.conv, s.ssm[:, :, :3].contiguous()],
                   torch.zeros(2, dtype=torch.long))


# -- the one-call plan over the block structures it accepts ----------------------------------------
class _Blocks(SequenceModel):
    """A model over hand-built blocks (the structures of hybrid, Hymba and SSTransformer, with
    mixers whose kernels this package ships)."""

    config_class = ModelConfig

    def __init__(self, config: ModelConfig, make_blocks) -> None:
        self._make = make_blocks
        super().__init__(config)

    def build_blocks(self, config):
        return self._make(config.hidden_size)


def _residual(pre_norm, ffn):
    return lambda d: [
        ResidualBlock(MIXERS["mamba"](), d, pre_norm=pre_norm, ffn=FFN(d, 2) if ffn else None),
        ResidualBlock(MIXERS["gated_ssm"](), d, pre_norm=pre_norm),
        ResidualBlock(MIXERS["mamba2"](), d, pre_norm=pre_norm, ffn=FFN(d, 2) if ffn else None),
    ]


def _parallel(fusion, normalize, pre_norm=True):
    return lambda d: [
        ParallelBlock(MIXERS["mamba"](), MIXERS[second](), d,
                      fusion={"gate": GateFusion, "mean": MeanFusion}[fusion](d, normalize=normalize),
                      ffn=FFN(d, 2), pre_norm=pre_norm)
        for second in ("gated_ssm", "mamba2")
    ]


STRUCTURES = {
    "pre_norm": _residual(True, False),
    "post_norm": _residual(False, False),
    "pre_norm_ffn": _residual(True, True),
    "post_norm_ffn": _residual(False, True),
    "gate": _parallel("gate", False),
    "gate_normalised": _parallel("gate", True),
    "mean": _parallel("mean", False),
    "mean_normalised": _parallel("mean", True),
    "gate_post_norm": _parallel("gate", True, pre_norm=False),
}


def _build(structure, dtype=torch.float32, embed_dim=6):
    torch.manual_seed(0)
    model = _Blocks(ModelConfig(embed_dim=embed_dim, hidden_size=D, num_layers=2), STRUCTURES[structure])
    model = model.to(dtype).eval()
    _perturb(model)
    return model


@pytest.fixture
def plan_runs(monkeypatch):
    calls = []
    real = plan_mod.StepPlan.run

    def counted(self, *args, **kw):
        out = real(self, *args, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(plan_mod.StepPlan, "run", counted)
    return calls


def _stream_matches_forward(model, B, T=6):
    dtype = next(model.parameters()).dtype
    x = torch.randn(B, T, model.config.embed_dim, dtype=dtype)
    cls = "fp64" if dtype == torch.float64 else "fp32"
    with torch.no_grad():
        want, want_state = model(x, return_sequence=True, return_state=True)
        for inplace in (True, False):
            state = model.init_state(B)
            ys = []
            for t in range(T):
                y, state = model.step(x[:, t], state, inplace=inplace)
                ys.append(y)
            assert_close(torch.stack(ys, 1), want, cls, msg=f"inplace={inplace}")
            assert_tree_close(state, want_state, cls, msg=f"inplace={inplace} state")


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_plan_equals_forward_for_every_structure(structure, plan_runs):
    model = _build(structure)
    assert plan_status(model) == "fused"
    _stream_matches_forward(model, B=2)
    assert plan_runs and all(plan_runs)


@pytest.mark.parametrize("B", [1, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plan_at_batch_1_and_through_the_gemm(B, dtype, plan_runs):
    model = _build("gate_normalised", dtype)
    _stream_matches_forward(model, B=B)
    assert plan_runs and all(plan_runs)


def test_plan_without_input_projection(plan_runs):
    model = _build("pre_norm_ffn", embed_dim=D)
    assert isinstance(model.input_proj, nn.Identity)
    _stream_matches_forward(model, B=2)
    assert plan_runs and all(plan_runs)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "gated_ssm"])
def test_models_of_this_package_take_the_plan(name, plan_runs):
    torch.manual_seed(0)
    model = hs.build(name, embed_dim=6, hidden_size=D, num_layers=2, state_size=4).eval()
    _perturb(model)
    assert plan_status(model) == "fused"
    _stream_matches_forward(model, B=2)
    assert plan_runs and all(plan_runs)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "seed_sinusoidal"])
def test_additive_positions_are_applied_before_the_one_call_step(positional, monkeypatch):
    # the model's own embedding (input projection + encoding at each row's position) runs first,
    # then the C++ plan from the blocks on: the stream equals the forward, rows at other positions too
    torch.manual_seed(0)
    model = hs.build("hybrid", embed_dim=6, hidden_size=D, num_layers=3, attention_every=3, num_heads=2,
                     head_dim=8, positional=positional, dropout=0.0).eval()
    assert plan_status(model) == "fused"
    ran = []
    original = plan_mod.StepPlan.run
    monkeypatch.setattr(plan_mod.StepPlan, "run",
                        lambda self, *a, **k: ran.append(original(self, *a, **k)) or ran[-1])
    x = torch.randn(2, 7, 6)
    with torch.inference_mode():
        want = model(x, return_sequence=True)
        _, state = model(x[:, :3], return_state=True)
        ys = []
        for t in range(3, 7):
            y, state = model.step(x[:, t], state, inplace=True)
            ys.append(y)
        y_fn, _ = model.step(x[:, 3], model(x[:, :3], return_state=True)[1])  # functional
    assert ran and all(r is not None for r in ran)
    assert_close(torch.stack(ys, 1), want[:, 3:])
    assert_close(y_fn, want[:, 3])


def test_plan_status_names_what_has_no_fused_form():
    class Odd(nn.Module):  # a custom mixer without step_spec
        def forward(self, x, state=None, *, lengths=None, inplace=False):
            return x, state

        def init_state(self, batch_size, **kw):
            return ()

    model = _Blocks(ModelConfig(embed_dim=6, hidden_size=D, num_layers=1),
                    lambda d: [ResidualBlock(Odd(), d)])
    assert "block 0" in plan_status(model)


def test_plan_status_under_the_torch_backend_says_so_and_builds_nothing(monkeypatch):
    import hybridssm.streaming.plan as plan_module
    from hybridssm.ops import use_kernels

    def no_build():
        raise AssertionError("plan_status built the step extension under the torch backend")

    monkeypatch.setattr(plan_module, "step_extension", no_build)
    model = hs.build("mamba", embed_dim=6, hidden_size=D, num_layers=1)  # a fresh model: no plan yet
    with use_kernels("torch"):
        assert "kernel backend is 'torch'" in plan_status(model)
    monkeypatch.undo()
    assert plan_status(model) == "fused"


def test_a_kernel_given_the_wrong_number_of_states_raises_instead_of_reading_past_them():
    # every kernel registers how many state tensors it reads: a call with fewer (or more) is refused
    # before the kernel runs (it indexes its states without bounds checks)
    mixer = hs.build_layer("gru", hidden_size=8).mixer.eval()
    spec = mixer.step_spec()
    state = mixer.init_state(1)
    x, pos = torch.randn(1, 8), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"mixer kind 'gru' takes 1 state tensors, got 0"):
        mixer_step(spec, x, [], pos)
    with pytest.raises(RuntimeError, match=r"takes 1 state tensors, got 2"):
        mixer_step(spec, x, [state.h, state.h.clone()], pos)
    assert mixer_step(spec, x, list(state), pos).shape == (1, 8)
