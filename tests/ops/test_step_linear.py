"""The streaming steps' projection (``csrc/step/common.h``'s ``linear_small``: GEMV for B <= 4,
``gemm_rows.h``'s blocked product, MKL for thin inputs) against ``F.linear``: every batch from 1 to
300 rows (each route, every remainder of the row block, several passes over the weight), inputs and
outputs that are not multiples of the block or the vector width, with and without bias, fp32 and
fp64, strided inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close
from hybridssm.ops.step import step_extension

# (inputs I, outputs O): the models' shapes, ragged ones (tails of the vector and of the 4-row
# column), thin inputs (MKL's route) and wide inputs (several passes over W at large B).
SHAPES = [(256, 256), (256, 1064), (512, 48), (1024, 40), (33, 5), (37, 7), (250, 131), (40, 1), (16, 40),
          (7, 3), (1030, 9)]
BATCHES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 16, 17, 31, 64, 65, 127, 128, 129, 200, 256, 300]
CLS = {torch.float32: "fp32", torch.float64: "fp64"}


def _linear(x, W, b):
    return step_extension().linear(x, W, torch.empty(0, dtype=x.dtype) if b is None else b)


def _case(B, I, O, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, I, generator=g, dtype=dtype)
    W = torch.randn(O, I, generator=g, dtype=dtype) / I**0.5
    b = torch.randn(O, generator=g, dtype=dtype) if bias else None
    return x, W, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"I{s[0]}xO{s[1]}")
def test_linear_matches_f_linear(shape, bias, dtype):
    I, O = shape
    for B in BATCHES:
        x, W, b = _case(B, I, O, dtype, bias, seed=B)
        assert_close(_linear(x, W, b), F.linear(x, W, b), CLS[dtype], msg=f"B={B} I={I} O={O}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [3, 5, 64, 129, 300])
def test_linear_strided_rows_and_weights(B, dtype):
    """x a column slice of a wider tensor (rows further apart than I), W and bias views to copy."""
    g = torch.Generator().manual_seed(B)
    wide = torch.randn(B, 300, generator=g, dtype=dtype)
    x = wide[:, 5:261]
    W = torch.randn(256, 130, generator=g, dtype=dtype).t()  # [130, 256], not contiguous
    b = torch.randn(260, generator=g, dtype=dtype)[::2]
    y = _linear(x, W, b)
    assert y.shape == (B, 130) and y.is_contiguous()
    assert_close(y, F.linear(x, W, b), CLS[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(256, 256), (250, 131), (1030, 9), (37, 7)],
                         ids=lambda s: f"I{s[0]}xO{s[1]}")
def test_linear_row_values_do_not_depend_on_the_other_rows(shape, dtype):
    """From 5 to 256 rows (gemm_rows.h's route) a row's outputs are bit for bit the same whatever the
    number of rows and its place among them (a remainder block, another pass over W: I = 1030 takes
    several): a restart appends rows to a step's product (prefill.h's linear_joint) and the step's own
    rows must keep the values of the step without them."""
    I, O = shape
    x, W, b = _case(256, I, O, dtype, True, seed=I + O)
    full = _linear(x, W, b)
    for B in (5, 6, 7, 8, 13, 17, 64, 65, 100, 129, 200, 255):
        for r in (0, 256 - B, (256 - B) // 3):
            got = _linear(x[r:r + B], W, b)
            assert torch.equal(got, full[r:r + B]), f"B={B} from row {r}"


def test_linear_every_output_written():
    """Outputs start as uninitialised memory: a NaN in the input row 7 reaches row 7 only, and no
    output is left unwritten (a wrong remainder block would leave rows or columns stale)."""
    for B, O in [(7, 13), (64, 6), (131, 1030), (300, 3)]:
        x, W, _ = _case(B, 256, O, torch.float32, False, seed=O)
        x[min(7, B - 1), 3] = float("nan")
        y = _linear(x, W, None)
        nan_rows = torch.isnan(y).any(dim=1).nonzero().flatten().tolist()
        assert nan_rows == [min(7, B - 1)], (B, O, nan_rows)
        assert_close(y[torch.arange(B) != min(7, B - 1)], F.linear(x, W)[torch.arange(B) != min(7, B - 1)])


def test_linear_names_a_misfit():
    x = torch.randn(5, 32)
    with pytest.raises(RuntimeError, match=r"linear: W must be \[O, I = 32\]"):
        _linear(x, torch.randn(4, 31), None)
    with pytest.raises(RuntimeError, match="does not fit"):
        _linear(x, torch.randn(4, 32), torch.randn(5))
    with pytest.raises(RuntimeError, match="linear: x must be a float or double CPU tensor"):
        _linear(x.to(torch.bfloat16), torch.randn(4, 32), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"I{s[0]}xO{s[1]}")
def test_linear_streamed_weights_give_the_same_values(shape, dtype):
    """Inside a plan whose weights come from memory the batch-1 GEMV reads one row from each of 4
    far-apart parts of W at a time instead of 8 neighbouring rows (common.h's weights_streamed,
    gemv_streams; 2-4 input rows gemv_streams_multi): each output is still its row's dot product
    alone, so the values are bit for bit those of the cached-weights path, at every batch (the rows
    left over by the parts included: O = 1, 3, 5, 7, 9, 131)."""
    I, O = shape
    for B in (1, 2, 3, 4, 5, 64):
        x, W, b = _case(B, I, O, dtype, True, seed=B + O)
        got = step_extension().linear(x, W, b, streamed=True)
        assert torch.equal(got, _linear(x, W, b)), f"B={B} I={I} O={O}"
        assert_close(got, F.linear(x, W, b), CLS[dtype], msg=f"B={B} I={I} O={O}")
