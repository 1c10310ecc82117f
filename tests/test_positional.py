"""Positional encodings: sinusoidal and learned (additive, per-row start) and RoPE."""

from __future__ import annotations

import math

import pytest
import torch

import hybridssm as hs
from helpers import assert_close
from hybridssm.layers import (
    LearnedPositions,
    SinusoidalPositions,
    apply_rope,
    seed_sinusoidal_encoding,
    sinusoidal_encoding,
)


def test_sinusoidal_values():
    enc = sinusoidal_encoding(torch.tensor([0, 3]), 6)
    assert_close(enc[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    w = [10000 ** (-2 * i / 6) for i in range(3)]
    want = [f(3 * wi) for wi in w for f in (math.sin, math.cos)]
    assert_close(enc[1], torch.tensor(want))
    assert sinusoidal_encoding(torch.tensor([1]), 5).shape == (1, 5)  # odd widths work


def test_seed_sinusoid_is_the_seeds_formula_in_fp64():
    # the seeds' add_positional_encoding: pe[t, j] = sin(t * 1 / (1 + j * 0.01)), positions from 0
    T, D = 70, 287
    want = torch.tensor(
        [[math.sin(t * (1.0 / (1.0 + j * 0.01))) for j in range(D)] for t in range(T)],
        dtype=torch.float64,
    )
    got = seed_sinusoidal_encoding(torch.arange(T, dtype=torch.float64), D)
    assert got.dtype == torch.float64
    assert_close(got, want, "fp64")
    # the fp32 integer-position path used by the models
    assert_close(seed_sinusoidal_encoding(torch.arange(T), D), want.float())


@pytest.mark.parametrize("name", ["hybrid", "transformer"])
def test_seed_sinusoid_is_reachable_by_name_and_added_after_the_projection(name):
    model = hs.build(name, embed_dim=6, hidden_size=6, num_layers=1, num_heads=2, head_dim=3,
                     positional="seed_sinusoidal", dropout=0.0)
    assert model.positional.seed
    h = torch.zeros(1, 4, 6)
    enc = model.positional(h, torch.zeros(1, dtype=torch.long))
    assert_close(enc[0], seed_sinusoidal_encoding(torch.arange(4), 6))


@pytest.mark.parametrize("pe", [SinusoidalPositions(6), SinusoidalPositions(6, seed=True),
                                LearnedPositions(6, 16)])
def test_additive_positions_stream_per_row(pe):
    h = torch.randn(2, 5, 6)
    full = pe(h, torch.zeros(2, dtype=torch.long))
    # rows at different starts: row 1 resumes at position 2
    start = torch.tensor([0, 2])
    part = pe(h[:, 2:4], start)
    assert_close(part[1], full[1, 2:4])
    assert_close(part[0], full[0, 0:2] - h[0, 0:2] + h[0, 2:4])
    steps = torch.cat([pe(h[:, t : t + 1], torch.full((2,), t)) for t in range(5)], 1)
    assert_close(steps, full)


def test_learned_positions_limit():
    pe = LearnedPositions(4, 8)
    pe(torch.zeros(1, 8, 4), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_positions=8"):
        pe(torch.zeros(1, 2, 4), torch.tensor([7]))


def test_rope_is_relative_and_norm_preserving():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 3, 8, generator=g), torch.randn(2, 1, 3, 8, generator=g)

    def score(pq: int, pk: int) -> torch.Tensor:
        qr = apply_rope(q, torch.full((2, 1), pq))
        kr = apply_rope(k, torch.full((2, 1), pk))
        return (qr * kr).sum(-1)

    assert_close(score(7, 3), score(4, 0))
    assert_close(score(100, 98), score(2, 0))
    assert not torch.allclose(score(7, 3), score(7, 4))
    x = torch.randn(2, 4, 3, 8, generator=g)
    xr = apply_rope(x, torch.arange(4).expand(2, 4))
    assert_close(xr.norm(dim=-1), x.norm(dim=-1))
    assert_close(xr[:, 0], x[:, 0])  # position 0 is the identity
    odd = torch.randn(1, 2, 1, 5, generator=g)
    assert_close(apply_rope(odd, torch.tensor([[3, 4]]))[..., -1], odd[..., -1])
