"""distrain's overhead over a hand-written PyTorch loop: same model, data, order and seed.

    python bench/overhead.py single [--model mlp|convnet] [--rounds 7] [--steps 400]
    python bench/overhead.py ddp [--rounds 7] [--steps 400]      # 2 gloo ranks under one torchrun
    python bench/overhead.py import [--rounds 15]

Method: every round is a fresh process (a fresh torchrun for ddp) that runs both loops one
after the other, the order alternating between rounds (A B, B A, ...), one thread per
process. Per-step times are medians after 20 warm-up steps; the printed figure is the
median over rounds of the per-round ratio distrain / hand-written, with its min-max. Final
weights are compared bit for bit. Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def worker(kind: str, model: str, steps: int, batch: int, distrain_first: bool) -> None:
    import torch

    torch.set_num_threads(1)
    from bench.common import hand_written, same_weights, steady, with_distrain

    ddp = kind == "ddp"
    if ddp:
        import distrain.dist

        torch.distributed.init_process_group("gloo")
        distrain.dist.shutdown = lambda: None  # keep this process's group for the other loop
    runs = {}
    for name in (["distrain", "hand"] if distrain_first else ["hand", "distrain"]):
        if name == "hand":
            runs[name] = hand_written(model, steps, batch, ddp=ddp)
        else:
            runs[name] = with_distrain(model, steps, batch, strategy="ddp" if ddp else "single")
    if not ddp or torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"hand": steady(runs["hand"][0]), "distrain": steady(runs["distrain"][0]),
                                      "same_weights": same_weights(runs["hand"][1], runs["distrain"][1])}))


def rounds(kind: str, model: str, n: int, steps: int, batch: int) -> list[dict]:
    out = []
    for i in range(n):
        args = ["_worker", kind, model, str(steps), str(batch), str(i % 2)]
        if kind == "ddp":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, *args]
        else:
            cmd = [sys.executable, __file__, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"round {i} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        out.append(json.loads(line[7:]))
        print(f"  round {i}: hand {out[-1]['hand'] * 1e3:.3f} ms  distrain {out[-1]['distrain'] * 1e3:.3f} ms  "
              f"same weights: {out[-1]['same_weights']}", flush=True)
    return out


def import_time(n: int) -> list[float]:
    code = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
            "import distrain.train, distrain.trainer, distrain.checkpoint, distrain.strategies.replicated; "
            "print(t1 - t0, time.perf_counter() - t1)")
    extra = []
    for _ in range(n):
        torch_s, ours = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                  env=ENV, check=True).stdout.split())
        extra.append(ours)
    return extra


def main() -> None:
    if sys.argv[1:2] == ["_worker"]:
        kind, model, steps, batch, first = sys.argv[2:7]
        worker(kind, model, int(steps), int(batch), first == "1")
        return
    from bench.common import ratio_line

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=["single", "ddp", "import"])
    p.add_argument("--model", default="mlp", choices=["mlp", "convnet"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    if args.case == "import":
        extra = import_time(args.rounds)
        print(f"import of distrain's training modules after torch: median {statistics.median(extra):.4f} s "
              f"(min {min(extra):.4f}, max {max(extra):.4f}; target <= 0.10 s)")
        return
    print(f"{args.case} / {args.model}, batch {args.batch}, {args.steps} steps, {args.rounds} rounds")
    results = rounds(args.case, args.model, args.rounds, args.steps, args.batch)
    ratios = [r["distrain"] / r["hand"] for r in results]
    print(ratio_line(f"{args.case}/{args.model} step time distrain / hand-written", ratios,
                     1.01 if args.case == "single" else 1.02))
    print(f"hand-written median {statistics.median(r['hand'] for r in results) * 1e3:.3f} ms/step; "
          f"final weights bit-identical in {sum(r['same_weights'] for r in results)}/{len(results)} rounds")


if __name__ == "__main__":
    main()
