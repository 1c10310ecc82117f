"""Data-parallel training (torch.distributed, gloo on CPU): two processes == one with the same
global batch. The two ranks are fresh processes forked from a server that has imported torch
(tests/forked.py), which saves each of them the 3-6 s of importing torch and its compiler stack."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import forked  # noqa: F401 - sets the fork server's preload (torch)
from helpers import assert_close
from hybridssm.training import TrainConfig, train

CFG = dict(
    model="gated_ssm",
    model_options=dict(hidden_size=16, num_layers=2),
    task="mqar",
    task_options=dict(vocab_size=16, seq_len=16, num_kv_pairs=2),
    steps=4, batch_size=8, eval_every=4, eval_size=16, log_every=1, warmup_steps=1, progress=False,
)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        res = train(TrainConfig(**CFG), out=os.path.join(out, "run"))
        torch.save({"params": res.model.state_dict(), "history": res.history},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_process_ddp_matches_single_process(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True,
                       start_method="forkserver")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in r0["params"]:  # replicas never drift apart
        assert torch.equal(r0["params"][k], r1["params"][k]), k

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(TrainConfig(**CFG))
    finally:
        torch.set_num_threads(n)
    assert [r["step"] for r in r0["history"]] == [r["step"] for r in single.history]
    for a, b in zip(r0["history"], single.history):
        assert_close(torch.tensor(a["loss"]), torch.tensor(b["loss"]), msg=f"step {a['step']}")
    assert_close(torch.tensor(r0["history"][-1]["test_loss"]), torch.tensor(single.history[-1]["test_loss"]))
    for k, v in single.model.state_dict().items():
        assert_close(r0["params"][k], v, msg=k)
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
