"""The Mamba-1 fused step (ops/csrc/step/mamba.h, mamba_update.h) over every path of its row update
(the unrolled state widths, any width, channel counts off the SIMD grid, the L2 warm-up of the output
projection at many streams), and with the projections' biases (``proj_bias``)."""

from __future__ import annotations

import pytest
import torch
from test_streaming_kernels import check_kernel_equals_forward

import hybridssm as hs
from helpers import assert_close, assert_tree_close
from hybridssm.mixers.mamba import MambaMixer
from hybridssm.ops import use_kernels
from hybridssm.streaming import plan_status


# N / SIMD width = 1, 3, 4 in fp32 (2 is the default model's, tested beside it) and 2, 6, 8 in fp64;
# N = 5 takes the loop for any width; d = 13 gives E = 26 channels, off the SIMD grid. B = 17 rows
# run the warm-up of out_proj's weight (B >= 16), B = 1 does not.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 17])
@pytest.mark.parametrize("d, N", [(16, 8), (13, 24), (16, 32), (13, 5)])
def test_mamba_kernel_over_every_row_update_path(d, N, B, dtype):
    torch.manual_seed(2)
    check_kernel_equals_forward(MambaMixer(d, state_size=N, conv_size=4), "mamba", B, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [1, 6])
def test_mamba_kernel_with_projection_biases(B, dtype):
    """The biases are perturbed away from their init, so a kernel that dropped one would fail."""
    torch.manual_seed(3)
    check_kernel_equals_forward(MambaMixer(16, state_size=4, conv_size=4, proj_bias=True), "mamba", B, 16,
                                dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mamba_kernel_softplus_over_its_whole_range(dtype):
    """dt_bias spread over -100..30: delta below fp32's normal range, around torch's threshold 20 and
    above it, through the step's own fp32 softplus (softplus.h) against the forward's F.softplus."""
    torch.manual_seed(4)
    m = MambaMixer(16, state_size=16, conv_size=4)
    with torch.no_grad():
        m.ssm.dt_bias.copy_(torch.linspace(-100.0, 30.0, m.ssm.dt_bias.numel()))
    check_kernel_equals_forward(m, "mamba", 9, 16, dtype)


def _stream(model, x):
    state = model.init_state(x.shape[0])
    ys = [model.step(x[:, t], state, inplace=True)[0] for t in range(x.shape[1])]
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("B", [2, 6])
def test_proj_bias_model_steps_in_one_call_equal_to_the_forward_and_the_module_step(B):
    torch.manual_seed(4)
    model = hs.build("mamba", embed_dim=6, hidden_size=16, num_layers=2, state_size=4, proj_bias=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.add_(0.3 * torch.randn_like(p))
    assert plan_status(model) == "fused"
    x = torch.randn(B, 7, 6)
    with torch.no_grad():
        want, want_state = model(x, return_sequence=True, return_state=True)
        fused, fused_state = _stream(model, x)
        with use_kernels("torch"):  # the module code, block by block
            plain, plain_state = _stream(model, x)
    assert_close(fused, want)
    assert_tree_close(fused_state, want_state)
    assert_close(fused, plain)
    assert_tree_close(fused_state, plain_state)
