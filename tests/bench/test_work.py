"""What a call issues (:mod:`hybridssm.bench.work`) and the GEMM rate of its own products
(:func:`hybridssm.bench.machine.products_rate`), on modules whose counts are known by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridssm.bench import (
    EXP_ELEMENTS,
    TRANSCENDENTALS,
    count_work,
    machine,
    machine_rates,
    matmul_flops,
    products_rate,
)


class Known(nn.Module):
    """One linear layer, one batched product and one of each counted transcendental kind."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)  # [3, 5]: 15 elements per op below
        a = F.softplus(h) + F.silu(h) + torch.sigmoid(h) + torch.softmax(h, -1) + torch.tanh(h)
        a = a + F.gelu(h) + F.logsigmoid(h) + torch.relu(h) + torch.rsqrt(h.abs() + 1)  # the last two: free
        a.exp_()  # in place counts too
        b = torch.einsum("bij,bjk->bik", y, y.transpose(1, 2))  # one bmm
        return a.sum() + b.sum()


@pytest.fixture
def known():
    torch.manual_seed(0)
    return Known(), torch.randn(3, 4), torch.randn(2, 3, 6)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_count_work_on_a_known_module(known, mode):
    module, x, y = known
    with mode():
        work = count_work(lambda: module(x, y))
    per = 15
    assert dict(work.by_op) == {"softplus": 2 * per, "silu": per, "sigmoid": per, "_softmax": per,
                                "tanh": per, "gelu": per, "log_sigmoid_forward": 2 * per, "exp": per}
    assert work.transcendentals == 10 * per
    assert work.flops == matmul_flops(lambda: module(x, y)) == 2 * 3 * 4 * 5 + 2 * 2 * 3 * 6 * 3
    assert sorted((str(p), n) for p, n in work.products.items()) == [
        ("addmm([5], [3, 4], [4, 5])", 1), ("bmm([2, 3, 6], [2, 6, 3])", 1)]


def test_transcendental_costs_are_documented_exps():
    assert TRANSCENDENTALS["exp"] == TRANSCENDENTALS["sigmoid"] == TRANSCENDENTALS["_softmax"] == 1
    assert TRANSCENDENTALS["softplus"] == 2
    assert "rsqrt" not in TRANSCENDENTALS and "relu" not in TRANSCENDENTALS


def test_replayed_products_keep_shape_layout_and_flops(known):
    module, x, y = known
    with torch.no_grad():
        work = count_work(lambda: module(x, y))
        flops = matmul_flops(lambda: module(x, y))
    replayed = 0
    for product, made in work.products.items():
        fn = product.replay()
        out = fn()
        replayed += made * matmul_flops(fn)
        if product.func.overloadpacket is torch.ops.aten.addmm:
            weight = product.args[2]
            assert out.shape == (3, 5) and weight.stride == (1, 4)  # transposed, as linear passes it
            assert product.tiny().replay()().shape == (1, 1)
    assert replayed == flops == 2 * 3 * 4 * 5 + 2 * 2 * 3 * 6 * 3


def test_products_rate_is_flops_over_the_products_time(known, monkeypatch):
    """Each product's time less the cost of calling it (its 1 x 1 twin), at least half of it kept;
    weighted by how many times the call made it; each shape timed once per cache."""
    module, x, y = known
    with torch.no_grad():
        work = count_work(lambda: module(x, y))
    (lin, bmm) = sorted(work.products, key=str)
    timed = []

    def fake(fn, seconds, chunks=5, device="cpu"):  # the product takes `seconds`, its twin seconds / 4
        timed.append(seconds)
        return seconds

    monkeypatch.setattr(machine, "best_seconds", fake)
    cache: dict = {}
    rate = products_rate({lin: 2, bmm: 1}, 1.0, cache=cache)
    assert rate == pytest.approx((2 * 120 + 216) / (3 * 0.75) / 1e9)
    assert timed == [0.25, 1.0, 0.25, 1.0]  # both products and their twins, once
    assert products_rate({lin: 1}, 1.0, cache=cache) == pytest.approx(120 / 0.75 / 1e9) and len(timed) == 4
    monkeypatch.setattr(machine, "best_seconds", lambda fn, seconds, chunks=5, device="cpu": 1e-3)
    assert products_rate({lin: 1}, 1.0) == pytest.approx(120 / 0.5e-3 / 1e9)  # the twin as slow: half kept
    assert products_rate({}, 1.0) is None


def test_exp_rate_is_measured_in_cache(monkeypatch):
    sizes = []
    real = torch.exp

    def exp(v, out=None):
        sizes.append((v.numel(), torch.get_num_threads()))
        return real(v, out=out)

    monkeypatch.setattr(torch, "exp", exp)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert machine_rates(seconds=0.01)["exp_gelems"] > 0
        assert set(sizes) == {(EXP_ELEMENTS, 1)} and torch.get_num_threads() == 2  # timed on one thread
        monkeypatch.setattr(machine, "hot_rate", lambda fn, work, seconds, device="cpu": 0.25)
        assert machine.exp_rate(0.01) == 0.5  # ... times the threads
    finally:
        torch.set_num_threads(threads)
    assert EXP_ELEMENTS * 4 * 2 <= 1 << 20  # in and out fit a 1 MiB L2
