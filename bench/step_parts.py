"""Where a single-process step's time goes: distrain's training step against hand-written
steps on the very same model, optimizer and data objects, in one process pinned to one core.

    python bench/step_parts.py [--model mlp|convnet] [--cycles 80]

Variants, each a difference from the plain hand-written step (`hand`: zero_grad, backward,
step, with distrain's optimizer: AdamW in its multi-tensor form): `torch-default`: `hand`
with a second AdamW over the same parameters in torch's CPU default form; `clear`: the grads set to None by a loop instead of `optimizer.zero_grad()`;
`clear+raw`: also the optimizer's update function called without `optimizer.step()`'s
wrapper; `guard`: `hand` plus distrain's non-finite check before the step; `distrain`:
`Trainer.train_step` itself (sampler, schedule, guard, loss window: everything but the
outer loop's logging). The variants take turns by 25-step windows, the order rotating;
printed: median window time, and the median per-cycle difference from `hand`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WINDOW = 25


def distrain_trainer(model: str, batch: int):
    """A built distrain Trainer (model, optimizer, data, sampler), captured before it trains."""
    from bench.common import with_distrain
    from distrain.trainer import Trainer

    captured = []

    def capture(self, on_start=None):
        captured.append(self)
        return self.summary(time.perf_counter(), 0, preempted=False)

    fit, Trainer.fit = Trainer.fit, capture
    try:
        with_distrain(model, 1, batch)
    finally:
        Trainer.fit = fit
    return captured[0]


def variants(trainer, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from distrain.strategies import common

    s = trainer.strategy
    model, opt, params = s.model, s.optimizer, s.params
    x, y = trainer.loader.dataset.tensors
    perm, position = torch.randperm(len(x)), [0]
    update = type(opt).step.__wrapped__
    one_by_one = torch.optim.AdamW(params, lr=1e-3)  # torch's CPU default: one tensor at a time

    def clear_grads(optimizer):  # what zero_grad(set_to_none=True) does, without its profiler range
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    def loss():
        p = position[0] % (len(x) - batch)
        position[0] += batch
        idx = perm[p : p + batch]
        return F.cross_entropy(model(x[idx]), y[idx])

    def hand():
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    def torch_default():
        value = loss()
        one_by_one.zero_grad(set_to_none=True)
        value.backward()
        one_by_one.step()

    def clear():
        value = loss()
        clear_grads(opt)
        value.backward()
        opt.step()

    def clear_raw():
        value = loss()
        clear_grads(opt)
        value.backward()
        update(opt)

    def guard():
        value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        if common.all_finite([p.grad for p in params]):
            opt.step()

    return {"hand": hand, "torch-default": torch_default, "clear": clear, "clear+raw": clear_raw, "guard": guard, "distrain": trainer.train_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=["mlp", "convnet"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cycles", type=int, default=80)
    args = p.parse_args()
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    import torch

    torch.set_num_threads(1)
    runs = variants(distrain_trainer(args.model, args.batch), args.batch)
    names = list(runs)
    for f in runs.values():  # warm-up
        for _ in range(2 * WINDOW):
            f()
    times = {name: [] for name in names}
    for c in range(args.cycles):
        for name in names[c % len(names):] + names[:c % len(names)]:
            t0 = time.perf_counter()
            for _ in range(WINDOW):
                runs[name]()
            times[name].append((time.perf_counter() - t0) / WINDOW)
    print(f"{args.model}, batch {args.batch}, {args.cycles} cycles of {WINDOW}-step windows, one core")
    for name in names:
        diff = statistics.median(a - b for a, b in zip(times[name], times["hand"]))
        print(f"{name:<14} {statistics.median(times[name]) * 1e6:8.1f} us   vs hand {diff * 1e6:+7.1f} us")


if __name__ == "__main__":
    main()
