"""Shared memory between the CPU ranks of one machine: the gradient average and DDP's bucket
all-reduce (gloo's exact result on two ranks, one agreed result on more), its flag barrier (a dead or stuck
peer is an error, not a hang), the preemption agreement over it, and the fall-back to gloo
when the ranks do not share memory."""
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
    from distrain.shm import shared_dir

    return {p for p in os.listdir(shared_dir()) if p.startswith("distrain-")}


def test_two_ranks_match_gloo_bitwise_and_leave_nothing_behind(tmp_path):
    before = _leftovers()
    run_train([*BASE, f"run.dir={tmp_path / 'shm'}"], nproc=2)
    run_train([*BASE, f"run.dir={tmp_path / 'gloo'}", "strategy.shared_memory=false"], nproc=2)
    shm, gloo = final_weights(tmp_path / "shm"), final_weights(tmp_path / "gloo")
    assert all(torch.equal(shm[k], gloo[k]) for k in gloo)
    assert _leftovers() == before
    assert "through shared memory" in (tmp_path / "shm" / "logs" / "rank0.log").read_text()
    assert "through shared memory" not in (tmp_path / "gloo" / "logs" / "rank0.log").read_text()


def _join(rank: int, world: int, port: int, split_dirs: str | None = None):
    torch.set_num_threads(1)
    from distrain import shm

    if split_dirs:  # each rank looks in its own directory: as if on different machines
        mine = Path(split_dirs) / str(rank)
        mine.mkdir(parents=True, exist_ok=True)
        shm.shared_dir = lambda: str(mine)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return shm


def _gradient(p, step: int, index: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * index + rank)
    return torch.randn(p.shape, generator=g).to(p.dtype)


def _allreduce_worker(rank: int, world: int, port: int, split_dirs: str | None, out: str) -> None:
    shm = _join(rank, world, port, split_dirs)
    from distrain.strategies import shm_allreduce

    group = shm.HostGroup.create(timeout_s=60)
    if group is None:
        torch.save({"shared": False}, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()
        return
    hook = shm_allreduce.BucketAllReduce(shm_allreduce.Slots.create(group, 4096))
    shm_allreduce.SLOT_CAP_BYTES = 1024  # the first gradient spans three exchanges, the others share one
    model = torch.nn.ParameterList([torch.zeros(600), torch.zeros(300, dtype=torch.bfloat16), torch.zeros(7)])
    averager = shm_allreduce.GradientAverager.create(group, model)
    buckets, grads = [], []
    for step in range(3):  # more calls than buffers: the alternation is exercised
        group.barrier()  # a barrier of its own between calls (as the preemption check makes)
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(100 * step + rank)
            bucket = torch.randn(1000, generator=g).to(dtype)
            buckets.append(hook.allreduce(bucket.clone()))
        for i, p in enumerate(model):
            p.grad = _gradient(p, step, i, rank)
        averager.average()
        grads.append([p.grad.clone() for p in model])
    model[1].grad = None
    try:
        averager.average()
        missing = "no error"
    except RuntimeError as e:
        missing = str(e)
    torch.save({"shared": True, "buckets": buckets, "grads": grads, "missing": missing}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(fn, world: int, *args) -> None:
    from distrain.dist import _free_port

    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


def test_three_ranks_agree_on_the_mean_of_every_bucket_and_gradient(tmp_path):
    _spawn(_allreduce_worker, 3, None, str(tmp_path))
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(3)]
    assert all(o["shared"] for o in out)
    i = 0
    for step in range(3):
        for dtype in (torch.float32, torch.bfloat16):
            inputs = [torch.randn(1000, generator=torch.Generator().manual_seed(100 * step + r)).to(dtype)
                      for r in range(3)]
            expected = sum(x.double() / 3 for x in inputs)
            for o in out:
                assert torch.equal(o["buckets"][i], out[0]["buckets"][i])  # the same bits on every rank
            tol = 1e-6 if dtype == torch.float32 else 2e-2
            assert torch.allclose(out[0]["buckets"][i].double(), expected, atol=tol)
            i += 1
        shapes = [(torch.zeros(600), 0), (torch.zeros(300, dtype=torch.bfloat16), 1), (torch.zeros(7), 2)]
        for p, index in shapes:  # DDP's arithmetic: each rank's share divided, then summed in rank order
            g = [_gradient(p, step, index, r) for r in range(3)]
            expected = (g[0] / 3 + g[1] / 3) + g[2] / 3
            assert all(torch.equal(o["grads"][step][index], expected) for o in out)
    assert all(o["missing"].startswith("ddp: parameter 1 of the model received no gradient") for o in out)


def test_ranks_that_do_not_share_memory_fall_back_to_gloo(tmp_path):
    _spawn(_allreduce_worker, 2, str(tmp_path / "dirs"), str(tmp_path))
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [o["shared"] for o in out] == [False, False]
    assert not any(p.name.startswith("distrain-") for p in (tmp_path / "dirs").rglob("*"))


def _barrier_worker(rank: int, world: int, port: int, peer_fate: str, timeout_s: float, out: str) -> None:
    shm = _join(rank, world, port)
    group = shm.HostGroup.create(timeout_s)
    group.barrier()
    if rank == 1:
        if peer_fate == "exits":
            os._exit(0)
        Path(f"{out}/done").touch()
        while not Path(f"{out}/error").exists():  # alive, never at the barrier: stuck
            os.sched_yield()
        os._exit(0)
    try:
        group.barrier()
        Path(f"{out}/error").write_text("no error")
    except RuntimeError as e:
        Path(f"{out}/error").write_text(str(e))
    os._exit(0)  # gloo's teardown would wait on the missing peer


def test_a_peer_that_exits_is_named_at_once_not_after_the_timeout(tmp_path):
    _spawn(_barrier_worker, 2, "exits", 60.0, str(tmp_path))
    assert (tmp_path / "error").read_text().startswith("rank(s) [1] exited while the others waited")


def test_a_stuck_peer_fails_the_barrier_after_the_timeout(tmp_path):
    _spawn(_barrier_worker, 2, "stuck", 1.0, str(tmp_path))
    assert (tmp_path / "error").read_text() == "rank(s) [1] did not arrive within strategy.timeout_s=1"


def _preempt_worker(rank: int, world: int, port: int, shared: bool, barrier_in_step: bool, out: str) -> None:
    shm = _join(rank, world, port)
    from distrain import dist as ddist
    from distrain.preempt import Preemption

    group = shm.HostGroup.create(60) if shared else None
    comm = ddist.Collectives(torch.device("cpu"), host=group)
    preemption = Preemption([], comm.stop_agreement())
    stopped_at = None
    for boundary in range(1, 30):
        if barrier_in_step:
            group.barrier()  # what the gradient average does inside a step
        if rank == 1 and boundary == 7:
            preemption.requested = True  # what the signal handler does
        if rank == 0 and boundary % 3 == 0:
            torch.randn(300, 300) @ torch.randn(300, 300)  # ranks reach boundaries at different times
        if preemption.should_stop():
            stopped_at = boundary
            break
    preemption.drain()
    torch.save({"stopped_at": stopped_at, "shared": isinstance(preemption.agreement, shm.StopAgreement),
                "barriers": group.arrivals if group else None}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_agree_on_a_preemption_at_the_same_boundary(tmp_path):
    # gloo's agreement is read one boundary later; so is the one that rides on the step's own barrier
    for shared, barrier_in_step, expected in ((True, False, 7), (False, False, 8), (True, True, 8)):
        _spawn(_preempt_worker, 2, shared, barrier_in_step, str(tmp_path))
        out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
        assert [o["stopped_at"] for o in out] == [expected, expected]
        assert [o["shared"] for o in out] == [shared, shared]
        if shared:  # one barrier per step, whoever runs it
            assert [o["barriers"] for o in out] == [expected, expected]


def _handed_group_worker(rank: int, world: int, port: int, out: str) -> None:
    from types import SimpleNamespace

    _join(rank, world, port)  # the caller made the process group, as an embedding program does
    from distrain import dist as ddist
    from distrain.train import _host_group

    env = SimpleNamespace(distributed=True)
    found = []
    for shared in (True, False):
        ddist.init(env, "gloo", torch.device("cpu"), 60)
        cfg = SimpleNamespace(strategy=SimpleNamespace(shared_memory=shared, timeout_s=60))
        found.append(_host_group(cfg, torch.device("cpu")) is not None)
    torch.save(found, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_a_process_group_made_by_the_caller_still_gets_shared_memory(tmp_path):
    _spawn(_handed_group_worker, 2, str(tmp_path))
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == [[True, False], [True, False]]


def _gather_worker(rank: int, world: int, port: int, out: str) -> None:
    shm = _join(rank, world, port)
    from distrain import dist as ddist
    from distrain.metrics import Window

    group = shm.HostGroup.create(60)
    rows = [group.gather([float(rank), 10.0 * rank + call]) for call in range(3)]  # back to back: the lines alternate
    window = Window()
    window.add([(0.25 * (rank + 1), 64)], 64 * world, 0.01, 0.0, 0.001 * (rank + 1))
    shared = window.reduce(ddist.Collectives(torch.device("cpu"), host=group))
    gloo = window.reduce(ddist.Collectives(torch.device("cpu")))
    torch.save({"rows": rows, "shared": shared, "gloo": gloo}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_log_line_statistics_gathered_through_shared_memory_equal_gloos(tmp_path):
    _spawn(_gather_worker, 3, str(tmp_path))
    for r in range(3):
        out = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert out["rows"] == [[[0.0, call], [1.0, 10.0 + call], [2.0, 20.0 + call]] for call in range(3)]
        (loss, busy), (gloo_loss, gloo_busy) = out["shared"], out["gloo"]
        assert loss == gloo_loss == (0.25 + 0.5 + 0.75) / 3
        assert busy == gloo_busy == [0.001, 0.002, 0.003]
