"""Same config, same optimization: every strategy on 2 ranks matches `single` on one process."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from conftest import CONFIGS, final_weights, max_abs_diff, metrics, run_train

BASE = ["--config", CONFIGS / "digits_mlp.yaml", "train.epochs=null", "train.max_steps=25", "train.log_every=5",
        "checkpoint.every_steps=0", "optim.name=adamw", "optim.lr=0.01", "sched.warmup_steps=5",
        "data.global_batch_size=64", "train.grad_clip=1.0", "model.hidden=[32,32]"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    run_train([*BASE, f"run.dir={run}", "strategy.name=single"])
    return final_weights(run)


@pytest.mark.parametrize("strategy", [
    ["strategy.name=ddp"],
    ["strategy.name=fsdp"],
    ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    ["strategy.name=ddp", "data.micro_batch_size=8"],  # 4 accumulation micro-steps per rank
    ["strategy.name=ddp", "data.micro_batch_size=8", "strategy.shared_memory=false"],  # DDP itself, no_sync
], ids=["ddp", "fsdp", "zero1", "zero2", "zero3", "ddp-accumulation", "torch-ddp-accumulation"])
def test_two_ranks_match_single_process(strategy, reference, tmp_path):
    run = tmp_path / "run"
    real = strategy in (["strategy.name=ddp"], ["strategy.name=deepspeed", "strategy.zero_stage=2"])
    run_train([*BASE, f"run.dir={run}", *strategy], nproc=2, torchrun=real)  # two under the real launcher
    assert max_abs_diff(final_weights(run), reference) <= 1e-5
    assert metrics(run, "train")[-1]["step"] == 25


def test_accumulation_on_one_process_matches_none(reference, tmp_path):
    run = tmp_path / "run"
    run_train([*BASE, f"run.dir={run}", "strategy.name=single", "data.micro_batch_size=16"])
    assert max_abs_diff(final_weights(run), reference) <= 1e-5


def test_short_last_batch_and_idle_ranks(tmp_path):
    """1437 training samples, global batch 480: each epoch ends with 477; on 3 ranks with micro 40 some
    micro-batches are partial. Still the same optimization as one process."""
    args = [*BASE, "data.global_batch_size=480", "train.max_steps=8"]
    one, three = tmp_path / "one", tmp_path / "three"
    run_train([*args, f"run.dir={one}", "strategy.name=single"])
    run_train([*args, f"run.dir={three}", "strategy.name=ddp", "data.micro_batch_size=40"], nproc=3)
    assert max_abs_diff(final_weights(one), final_weights(three)) <= 1e-5


def test_eval_identical_on_1_2_and_3_ranks(tmp_path):
    """Evaluate the same weights on 1, 2 and 3 ranks (resuming a finished run re-evaluates it): 100 eval
    samples in batches of 16 divide by neither 3 nor the batch size."""
    run = tmp_path / "run"
    args = ["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={run}", "data.name=synthetic", "data.n_train=256",
            "data.n_eval=100", "data.eval_batch_size=16", "data.global_batch_size=12", "train.epochs=null",
            "train.max_steps=10", "strategy.name=ddp"]
    run_train(args)
    run_train(args, nproc=2)
    run_train(args, nproc=3)
    evals = metrics(run, "eval")
    assert len(evals) == 3 and all(e["step"] == 10 and e["samples"] == 100 for e in evals)
    assert evals[0]["loss"] == evals[1]["loss"] == evals[2]["loss"]
    assert evals[0]["accuracy"] == evals[1]["accuracy"] == evals[2]["accuracy"]


def test_ddp_on_one_process_runs_unwrapped_and_matches_single(reference, tmp_path):
    """A one-rank DDP has nothing to all-reduce: the module stays bare (no collective per step)."""
    strategy = _ddp_strategy(torch.nn.Linear(2, 2), host=None)
    assert strategy.model is strategy.module and strategy.average is None
    run = tmp_path / "run"
    run_train([*BASE, f"run.dir={run}", "strategy.name=ddp"], nproc=1)
    assert max_abs_diff(final_weights(run), reference) == 0


def _ddp_strategy(module, host):
    from distrain.cluster import ClusterEnv
    from distrain.dist import Collectives, world_size
    from distrain.strategies import StrategyContext, spec

    ctx = StrategyContext(None, ClusterEnv(world_size=world_size()), torch.device("cpu"), "gloo",
                          Collectives(torch.device("cpu"), host), micro_batch=2, accumulation=2, global_batch=8)
    strategy = spec("ddp").build(ctx)
    strategy.setup(module, lambda params, fused=False: torch.optim.SGD(params, lr=0.0))
    return strategy


def _no_sync_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    strategy = _ddp_strategy(torch.nn.Linear(3, 1), host=None)
    assert isinstance(strategy.model, DistributedDataParallel)
    x = torch.full((2, 3), float(rank + 1))
    grads = []
    for sync in (False, True):  # an accumulation micro-step keeps its gradient local; the last one averages
        with strategy.micro_step(sync=sync):
            strategy.backward(strategy.model(x).sum())
        grads.append(strategy.module.weight.grad.clone())
    torch.save(grads, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # gloo's worker threads can abort the interpreter's teardown (as distrain's end_process avoids)


def test_torch_ddp_keeps_accumulation_micro_steps_local(tmp_path):
    """strategy.shared_memory=false: torch's DDP with its own no_sync, on gloo."""
    from distrain.dist import _free_port

    mp.spawn(_no_sync_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    local, synced = zip(*(torch.load(tmp_path / f"rank{r}.pt") for r in range(2)))
    assert torch.equal(local[0], torch.full((1, 3), 2.0)) and torch.equal(local[1], torch.full((1, 3), 4.0))
    # the mean over ranks of (micro-step 1 + micro-step 2) = ((2 + 2) + (4 + 4)) / 2
    assert torch.equal(synced[0], torch.full((1, 3), 6.0)) and torch.equal(synced[1], synced[0])
