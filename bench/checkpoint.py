"""Checkpoint throughput: distrain's save/load path vs a raw torch.save / torch.load of the
same state on the same disk, and DCP async save's blocking time vs a synchronous save.

    python bench/checkpoint.py [--mb 256] [--rounds 6]
    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/checkpoint.py --async-case

distrain's save includes what the raw save does not: the per-rank RNG files, the trainer
state, the manifest, fsync of every file and the atomic commit. Its load applies the state
to the model and optimizer, as a hand-written resume after torch.load does, and adds the
integrity checks (sizes, zip CRCs, pickled-globals vetting). The raw figures are given with
and without fsync, since a checkpoint that is not on disk is not a checkpoint.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def model_of(mb: int) -> torch.nn.Module:
    width = 1024
    layers = max(1, mb * 2**20 // (4 * 3 * width * width))  # weights + Adam's two moments
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])


def adam_state(model):
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return opt


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def timed_call(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def harness(d: str, model, make_optimizer):
    """distrain's checkpointer around `model`, as the trainer drives it (a single process)."""
    from distrain.checkpoint import Checkpointer
    from distrain.cluster import ClusterEnv
    from distrain.config import load_config, to_dict
    from distrain.dist import Collectives
    from distrain.strategies import StrategyContext, spec

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "configs" / "digits_mlp.yaml"), [f"run.dir={d}/run", "strategy.name=single",
                                                                   "checkpoint.keep_last=1"])
    env = ClusterEnv()
    comm = Collectives(torch.device("cpu"))
    strategy = spec("single").build(StrategyContext(cfg.strategy, env, torch.device("cpu"), "gloo", comm, 64, 1, 64))
    strategy.setup(model, lambda params, fused=False: make_optimizer(model))
    trainer = SimpleNamespace(step=0, state_dict=lambda: {"step": trainer.step, "data": {"epoch": 0, "position": 0}},
                              load_state_dict=lambda s: None)
    ckpt = Checkpointer(cfg.checkpoint, cfg.run_dir, env, "full", to_dict(cfg))
    ckpt.track(comm, strategy, trainer=trainer)
    return strategy, trainer, ckpt


def loaders(d: str, model, optimizer, ckpt, trainer) -> dict:
    def apply(loaded):  # what a hand-written resume does after torch.load
        model.load_state_dict(loaded["model"])
        optimizer.load_state_dict(loaded["optimizer"])
    raw, raw2, path = Path(d) / "raw.pt", Path(d) / "rawb.pt", Path(ckpt.latest_path())
    return {"raw load": lambda: torch.load(raw, weights_only=True),
            "raw load+apply": lambda: apply(torch.load(raw2, weights_only=True)),
            "distrain load": lambda: ckpt._try_load(path)}


def child_load(d: str, mb: int, name: str) -> None:
    """One load in this fresh process, as a resume does it: a new model, an optimizer without state."""
    model = model_of(mb)
    strategy, trainer, ckpt = harness(d, model, lambda m: torch.optim.AdamW(m.parameters()))
    print(timed_call(loaders(d, model, strategy.optimizer, ckpt, trainer)[name]))


def single_process(mb: int, rounds: int) -> None:
    model = model_of(mb)
    size = sum(p.numel() * 4 * 3 for p in model.parameters()) / 2**20
    results = {"raw save": [], "raw save+fsync": [], "distrain save": [], "raw load": [], "raw load+apply": [],
               "distrain load": []}
    fresh = {f"{k}, fresh process": [] for k in ("raw load", "raw load+apply", "distrain load")}
    with tempfile.TemporaryDirectory(dir=".") as d:
        strategy, trainer, ckpt = harness(d, model, adam_state)
        state = {"model": model.state_dict(), "optimizer": strategy.optimizer.state_dict()}
        raw, raw2 = Path(d) / "raw.pt", Path(d) / "rawb.pt"
        for r in range(rounds):
            trainer.step = r + 1
            timed = {"raw save+fsync": lambda: (torch.save(state, raw2), fsync(raw2)),
                     "distrain save": lambda: ckpt.save(trainer.step)}
            # AB, BA, ...: each goes first as often (on a virtual disk, writes right after a
            # flush are slower), and none pays for the writeback of another's dirty pages
            for name in (list(timed) if r % 2 == 0 else list(timed)[::-1]):
                os.sync()
                results[name].append(timed_call(timed[name]))
            results["raw save"].append(timed_call(lambda: torch.save(state, raw)))
            ckpt.wait_for_deletions()
        # loads after all saves, with nothing left to write back: reads of the page cache only
        os.sync()
        loads = loaders(d, model, strategy.optimizer, ckpt, trainer)
        for r in range(2 * rounds):
            names = list(loads)[r % 3:] + list(loads)[: r % 3]  # each goes first as often
            for name in names:
                results[name].append(timed_call(loads[name]))
        # a resume runs in a new process, whose allocator has no freed memory to reuse: every
        # page of the loaded state is faulted in fresh, which the loads above mostly skip
        for r in range(rounds):
            for name in list(loads)[r % 3:] + list(loads)[: r % 3]:
                out = subprocess.run([sys.executable, __file__, "--child-load", name, "--dir", d, "--mb", str(mb)],
                                     check=True, capture_output=True, text=True).stdout
                fresh[f"{name}, fresh process"].append(float(out.split()[-1]))
    results.update(fresh)
    if os.environ.get("BENCH_VERBOSE"):
        for k, v in results.items():
            print(k, " ".join(f"{x * 1e3:.0f}" for x in v))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"state {size:.0f} MiB, {rounds} rounds, medians:")
    for k, v in med.items():
        print(f"  {k:30s} {v:7.3f} s   {size / v:8.0f} MiB/s")

    def ratio(raw: str, ours: str) -> str:  # throughput ratio per round (both ran in it), then the median
        per_round = [a / b for a, b in zip(results[raw], results[ours])]
        return f"{statistics.median(per_round):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"
    print(f"save throughput distrain / raw+fsync: {ratio('raw save+fsync', 'distrain save')} "
          f"(vs raw without fsync: {ratio('raw save', 'distrain save')}; target >= 0.9)")
    print(f"load throughput distrain / raw: {ratio('raw load', 'distrain load')} "
          f"(vs raw load+apply: {ratio('raw load+apply', 'distrain load')}; target >= 0.9)")
    print(f"resume in a fresh process, load throughput distrain / raw: "
          f"{ratio('raw load, fresh process', 'distrain load, fresh process')} (vs raw load+apply: "
          f"{ratio('raw load+apply, fresh process', 'distrain load, fresh process')}; target >= 0.9)")


def async_case(mb: int, rounds: int) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    model = model_of(mb)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    opt = adam_state(model)
    group = dist.new_group(backend="gloo")
    from distrain.strategies.fsdp import staging_for

    stager = staging_for(torch.device("cpu"))
    sync_s, async_s = [], []
    d = Path(__file__).resolve().parent / "out" / "dcp"  # one path for all ranks
    if dist.get_rank() == 0:
        shutil.rmtree(d, ignore_errors=True)
    dist.barrier()
    for r in range(rounds):
        ms, os_ = get_state_dict(model, opt)
        dist.barrier()
        t = time.perf_counter()
        dcp.save({"model": ms, "optim": os_}, checkpoint_id=f"{d}/sync{r}")
        dist.barrier()
        sync_s.append(time.perf_counter() - t)
        ms, os_ = get_state_dict(model, opt)
        dist.barrier()
        t = time.perf_counter()
        future = dcp.async_save({"model": ms, "optim": os_}, checkpoint_id=f"{d}/async{r}", process_group=group,
                                async_stager=stager)
        async_s.append(time.perf_counter() - t)  # training resumes here
        future.result()
        dist.barrier()
    stager.close()
    if dist.get_rank() == 0:
        shutil.rmtree(d, ignore_errors=True)
        s, a = statistics.median(sync_s), statistics.median(async_s)
        print(f"DCP 2 ranks, ~{mb} MiB state, {rounds} rounds: sync save {s:.3f} s, async blocking {a:.3f} s "
              f"= {a / s:.1%} of sync (first round {async_s[0]:.3f} s; target <= 10%)")
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--async-case", action="store_true")
    p.add_argument("--child-load", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.child_load:
        child_load(a.dir, a.mb, a.child_load)
    elif a.async_case:
        async_case(a.mb, a.rounds)
    else:
        single_process(a.mb, a.rounds)
