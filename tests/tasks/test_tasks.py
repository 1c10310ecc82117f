"""Synthetic tasks: layouts, scored positions, determinism, disjoint seed streams, power law."""

from __future__ import annotations

import pytest
import torch

from hybridssm.tasks import IGNORE, TASKS, build_task, derive_seed
from hybridssm.tasks.selective_copy import BLANK, MARKER

SYNTHETIC = ["mqar", "parity", "selective_copy"]


def test_registry_lists_all_tasks():
    assert sorted(TASKS) == ["data", *SYNTHETIC]


@pytest.mark.parametrize("name, chance", [("mqar", 1 / 32), ("parity", 0.5), ("selective_copy", 1 / 14)])
def test_chance_is_one_over_the_possible_answers(name, chance):
    assert build_task(name).chance == pytest.approx(chance)
    assert not build_task(name).regression and build_task(name).input_dim is None


@pytest.mark.parametrize("name", SYNTHETIC)
def test_deterministic_from_seed_and_shapes(name):
    task = build_task(name)
    a = task.batch(3, "train", 5, 16)
    b = task.batch(3, "train", 5, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = task.batch(3, "train", 6, 16)
    assert not torch.equal(a[0], c[0])
    tokens, targets = a
    assert tokens.dtype == targets.dtype == torch.long
    assert tokens.shape == targets.shape == (16, task.seq_len_for("train"))
    assert tokens.min() >= 0 and tokens.max() < task.vocab_size
    scored = targets[targets != IGNORE]
    assert scored.numel() > 0 and scored.min() >= 0 and scored.max() < task.num_classes


def test_train_and_test_seeds_are_disjoint():
    train = {derive_seed(s, "train", i) for s in range(4) for i in range(200)}
    test = {derive_seed(s, "test", i) for s in range(4) for i in range(200)}
    assert not train & test
    assert all(x % 2 == 0 for x in train) and all(x % 2 == 1 for x in test)
    task = build_task("mqar", vocab_size=64, seq_len=64, num_kv_pairs=4)
    tr = {tuple(r) for r in task.batch(0, "train", 0, 256)[0].tolist()}
    te = {tuple(r) for r in task.batch(0, "test", 0, 256)[0].tolist()}
    assert not tr & te


def test_mqar_layout_and_scoring():
    V, T, N = 32, 32, 4
    task = build_task("mqar", vocab_size=V, seq_len=T, num_kv_pairs=N)
    tokens, targets = task.generate(64, seed=1)
    keys, values = tokens[:, 0 : 2 * N : 2], tokens[:, 1 : 2 * N : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    for row in range(64):
        assert len(set(keys[row].tolist())) == N and len(set(values[row].tolist())) == N
        pos = (targets[row] != IGNORE).nonzero().flatten()
        assert len(pos) == N  # exactly one query per key, only queries scored
        assert (pos >= 2 * N).all() and ((pos - 2 * N) % 2 == 0).all()
        pairs = dict(zip(keys[row].tolist(), values[row].tolist()))
        for p in pos.tolist():
            assert targets[row, p].item() == pairs[tokens[row, p].item()]
        assert sorted(tokens[row, pos].tolist()) == sorted(pairs)
    assert (targets[:, : 2 * N] == IGNORE).all()


def test_mqar_power_law_gaps():
    task = build_task("mqar", vocab_size=64, seq_len=128, num_kv_pairs=1, power_a=0.01)
    _, targets = task.generate(4000, seed=0)
    gaps = ((targets != IGNORE).nonzero()[:, 1] - 2) // 2
    counts = torch.bincount(gaps, minlength=63).double()
    p = task.gap_probabilities()
    # p(g) ~ (g+1)^-0.99: the first gap is about twice the second and ~60x the last.
    assert p[0] / p[1] == pytest.approx(2 ** 0.99) and p[0] / p[-1] > 50
    freq = counts / counts.sum()
    assert abs(freq[0] - p[0]) < 0.03 and freq[:5].sum() > 0.45 and freq[-20:].sum() < 0.15


def test_mqar_bad_options():
    with pytest.raises(ValueError, match="num_kv_pairs"):
        build_task("mqar", seq_len=16, num_kv_pairs=5)
    with pytest.raises(ValueError, match="vocab_size"):
        build_task("mqar", vocab_size=15)
    with pytest.raises(TypeError, match="did you mean 'num_kv_pairs'"):
        build_task("mqar", num_kv_pair=4)
    with pytest.raises(ValueError, match="did you mean 'mqar'"):
        build_task("mqr")


def test_selective_copy_layout():
    task = build_task("selective_copy", vocab_size=10, seq_len=24, num_tokens=5)
    tokens, targets = task.generate(32, seed=2)
    R = 24 - 1 - 5
    assert (tokens[:, R] == MARKER).all() and (tokens[:, R + 1 :] == BLANK).all()
    assert (targets[:, : R + 1] == IGNORE).all()
    for row in range(32):
        data = tokens[row, :R][tokens[row, :R] != BLANK]
        assert torch.equal(data, targets[row, R + 1 :])  # reproduce in order
        assert (data >= 2).all()


def test_parity_targets_and_lengths():
    task = build_task("parity", seq_len=8, test_seq_len=20)
    bits, targets = task.batch(0, "train", 0, 16)
    assert bits.shape == (16, 8)
    for row in range(16):
        acc = 0
        for t in range(8):
            acc ^= int(bits[row, t])
            assert targets[row, t] == acc
    assert task.batch(0, "test", 0, 4)[0].shape == (4, 20)
