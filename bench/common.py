"""Shared pieces of the benchmarks: the hand-written reference loop, running distrain in
the same process, and the statistics (medians of interleaved rounds, min-max spread)."""
from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distrain.data.datasets import digits
from distrain.data.sampler import epoch_permutation, even_slice
from distrain.models.vision import cnn, mlp

ROOT = Path(__file__).resolve().parents[1]
LOG_EVERY = 25
MODELS = {
    "mlp": (lambda: mlp((1, 8, 8), 10, [256, 256]), ["model.name=mlp", "model.hidden=[256,256]"]),
    "convnet": (lambda: cnn((1, 8, 8), 10), ["model.name=cnn"]),
}


def reference_loop(model_name: str, steps: int, batch: int, prepare, seed: int = 0, lr: float = 1e-3,
                   ddp: bool = False, tick=None):
    """The loop a user writes by hand, through `prepare(model, optimizer) -> (net, optimizer,
    backward)`: plain PyTorch or a peer library's wrappers. Same data order (one permutation
    per epoch), same init. Returns (step-time window means, final state_dict). `tick`, if
    given, is called at the top of every iteration (bench/relay.py's turn-taking)."""
    torch.manual_seed(seed)
    model = MODELS[model_name][0]()
    net, opt, backward = prepare(model, torch.optim.AdamW(model.parameters(), lr=lr))
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    x, y = digits()[0].tensors
    n, times, epoch, pos = len(x), [], 0, 0
    perm = epoch_permutation(n, seed, epoch)
    for _ in range(steps):
        if tick is not None:
            tick()
        t0 = time.perf_counter()
        if pos >= n:
            epoch, pos = epoch + 1, 0
            perm = epoch_permutation(n, seed, epoch)
        size = min(batch, n - pos)
        lo, hi = even_slice(size, world, rank)
        idx = perm[pos : pos + size][lo:hi]
        pos += size
        loss = F.cross_entropy(net(x[idx]), y[idx])
        if len(idx) * world != size:  # the epoch's short last batch splits unevenly: weight by share
            loss = loss * (len(idx) * world / size)
        opt.zero_grad(set_to_none=True)
        backward(loss)
        opt.step()
        times.append(time.perf_counter() - t0)
    windows = [statistics.fmean(times[i : i + LOG_EVERY]) for i in range(0, steps - LOG_EVERY + 1, LOG_EVERY)]
    return windows, {k: v.detach().clone() for k, v in model.state_dict().items()}


def hand_written(model_name: str, steps: int, batch: int, ddp: bool = False, **kw):
    def prepare(model, opt):
        net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
        return net, opt, lambda loss: loss.backward()

    return reference_loop(model_name, steps, batch, prepare, ddp=ddp, **kw)


def with_distrain(model_name: str, steps: int, batch: int, seed: int = 0, lr: float = 1e-3, strategy: str = "single",
                  extra: tuple = (), tick=None):
    """distrain's own loop through its CLI entry, in this process. Step times are distrain's
    `step_time_s` (data, forward, backward, norm/guard, optimizer step), each the mean of a
    window of LOG_EVERY steps, as a user would log (logging every step costs more than the step).
    `tick`, if given, is called at the top of every training step."""
    from distrain.trainer import Trainer

    train_step = Trainer.train_step
    if tick is not None:
        Trainer.train_step = lambda self: (tick(), train_step(self))[1]
    try:
        return _run_distrain(model_name, steps, batch, seed, lr, strategy, extra)
    finally:
        Trainer.train_step = train_step


def _run_distrain(model_name: str, steps: int, batch: int, seed: int, lr: float, strategy: str, extra: tuple):
    from distrain.train import main

    with tempfile.TemporaryDirectory() as d:
        if strategy != "single":  # every rank must see the same run dir
            d = str(ROOT / "bench" / "out" / "ddp")
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(d, ignore_errors=True)
                Path(d).mkdir(parents=True)
            torch.distributed.barrier()
        base = Path(d) / "base.yaml"  # the demo's data, no model section: the model comes from MODELS
        base.write_text("data: {name: digits}\noptim: {name: adamw}\n")
        code = main(["--config", str(base), *MODELS[model_name][1],
                     f"run.dir={d}/run", f"run.seed={seed}", "train.epochs=null", f"train.max_steps={steps}",
                     f"train.log_every={LOG_EVERY}", "train.eval_every=0", "checkpoint.every_steps=0", f"optim.lr={lr}",
                     "optim.weight_decay=0.01", "sched.name=constant", "sched.warmup_steps=0",
                     f"data.global_batch_size={batch}", f"strategy.name={strategy}", "log.level=warning", *extra])
        assert code == 0, f"distrain exited {code}"
        rows = [json.loads(line) for line in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
        times = [r["step_time_s"] for r in rows if r["split"] == "train" and r["step"] % LOG_EVERY == 0]
        weights = torch.load(Path(d) / "run" / "final" / "model.pt", weights_only=True)
    return times, weights


def steady(windows: list[float], warmup_steps: int = 50) -> float:
    """Median of the step-time window means after warm-up (every loop reports LOG_EVERY-step windows)."""
    return statistics.median(windows[max(1, warmup_steps // LOG_EVERY):])


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def ratio_line(name: str, ratios: list[float], target: float | None = None) -> str:
    med = statistics.median(ratios)
    verdict = "" if target is None else ("  (target <= %.2f: %s)" % (target, "met" if med <= target else "MISSED"))
    return f"{name}: median ratio {med:.4f}, min {min(ratios):.4f}, max {max(ratios):.4f} over {len(ratios)} rounds{verdict}"
