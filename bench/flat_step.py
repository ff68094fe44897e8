"""What flat buffers would save in a small model's optimizer step, measured alone in one process
pinned to one core: AdamW over the model's parameters in torch's default per-tensor form, in its
multi-tensor form, and over one flat tensor holding them all; the global gradient norm as
distrain computes it (`total_norm`: per-tensor norms, stacked) and over one flat gradient; zeroing that gradient.

    python bench/flat_step.py [--model mlp|convnet] [--cycles 30]

The variants take turns by 50-call windows; printed: the median window's time per call.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WINDOW = 50


def variants(model_name: str) -> dict:
    import torch

    from bench.common import MODELS
    from distrain.strategies.common import total_norm

    params = list(MODELS[model_name][0]().parameters())
    flat = torch.nn.Parameter(torch.cat([p.detach().view(-1) for p in params]))
    for p in params:
        p.grad = torch.randn_like(p)
    flat.grad = torch.randn_like(flat)
    grads = [p.grad for p in params]
    per_tensor = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    multi_tensor = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    one_flat = torch.optim.AdamW([flat], lr=1e-3, foreach=False)
    return {
        "AdamW, torch's default (per tensor)": per_tensor.step,
        "AdamW, multi-tensor": multi_tensor.step,
        "AdamW, one flat tensor": one_flat.step,
        "norm, distrain's total_norm": lambda: total_norm(grads).item(),
        "norm, one flat gradient": lambda: torch.linalg.vector_norm(flat.grad).item(),
        "zero one flat gradient": flat.grad.zero_,
    }, sum(p.numel() for p in params)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnet", choices=["mlp", "convnet"])
    p.add_argument("--cycles", type=int, default=30)
    args = p.parse_args()
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    import torch

    torch.set_num_threads(1)
    runs, n = variants(args.model)
    for f in runs.values():  # warm-up
        for _ in range(WINDOW):
            f()
    times = {name: [] for name in runs}
    names = list(runs)
    for c in range(args.cycles):
        for name in names[c % len(names):] + names[:c % len(names)]:
            t0 = time.perf_counter()
            for _ in range(WINDOW):
                runs[name]()
            times[name].append((time.perf_counter() - t0) / WINDOW)
    print(f"{args.model}, {n} parameters, {args.cycles} cycles of {WINDOW}-call windows, one core")
    for name in names:
        print(f"{name:<36} {statistics.median(times[name]) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
