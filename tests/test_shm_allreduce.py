"""DDP's shared-memory gradient all-reduce on CPU: gloo's exact result on two ranks, one
agreed result on more, and a fall-back to gloo when the ranks do not share memory."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import CONFIGS, final_weights, run_train

BASE = ["--config", CONFIGS / "digits_mlp.yaml", "train.epochs=null", "train.max_steps=60", "train.eval_every=0",
        "strategy.name=ddp"]


def _leftovers() -> set:
    from distrain.strategies.shm_allreduce import shared_dir

    return {p for p in os.listdir(shared_dir()) if p.startswith("distrain-ddp-")}


def test_two_ranks_match_gloo_bitwise_and_leave_nothing_behind(tmp_path):
    before = _leftovers()
    run_train([*BASE, f"run.dir={tmp_path / 'shm'}"], nproc=2)
    run_train([*BASE, f"run.dir={tmp_path / 'gloo'}", "strategy.shm_allreduce=false"], nproc=2)
    shm, gloo = final_weights(tmp_path / "shm"), final_weights(tmp_path / "gloo")
    assert all(torch.equal(shm[k], gloo[k]) for k in gloo)
    assert _leftovers() == before
    assert "through shared memory" in (tmp_path / "shm" / "logs" / "rank0.log").read_text()
    assert "through shared memory" not in (tmp_path / "gloo" / "logs" / "rank0.log").read_text()


def _worker(rank: int, world: int, port: int, split_dirs: str | None, out: str) -> None:
    torch.set_num_threads(1)
    from distrain.strategies import shm_allreduce

    if split_dirs:  # each rank looks in its own directory: as if on different machines
        mine = Path(split_dirs) / str(rank)
        mine.mkdir(parents=True, exist_ok=True)
        shm_allreduce.shared_dir = lambda: str(mine)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    state = shm_allreduce.ShmAllReduce.create(slot_bytes=4096)
    if state is None:
        torch.save({"shared": False}, f"{out}/rank{rank}.pt")
    else:
        results = []
        for step in range(3):  # more calls than buffers: the alternation is exercised
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(100 * step + rank)
                bucket = torch.randn(1000, generator=g).to(dtype)
                results.append(state.allreduce(bucket.clone()))
        torch.save({"shared": True, "results": results}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(world: int, tmp_path: Path, split_dirs: bool) -> list[dict]:
    from distrain.dist import _free_port

    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path / "dirs") if split_dirs else None, str(tmp_path)),
             nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def test_three_ranks_agree_on_the_mean_of_every_bucket(tmp_path):
    out = _spawn(3, tmp_path, split_dirs=False)
    assert all(o["shared"] for o in out)
    i = 0
    for step in range(3):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = [torch.randn(1000, generator=torch.Generator().manual_seed(100 * step + r)).to(dtype)
                      for r in range(3)]
            expected = sum(x.double() / 3 for x in inputs)
            for o in out:
                assert torch.equal(o["results"][i], out[0]["results"][i])  # the same bits on every rank
            tol = 1e-6 if dtype == torch.float32 else 2e-2
            assert torch.allclose(out[0]["results"][i].double(), expected, atol=tol)
            i += 1


def test_ranks_that_do_not_share_memory_fall_back_to_gloo(tmp_path):
    out = _spawn(2, tmp_path, split_dirs=True)
    assert [o["shared"] for o in out] == [False, False]
    assert not any(p.name.startswith("distrain-ddp-") for p in (tmp_path / "dirs").rglob("*"))
