"""Weak scaling on CPU gloo, one thread per rank: the per-rank batch stays fixed and the
global batch grows with the world size; efficiency = throughput(N) / (N x throughput(1)).

    python bench/scaling.py [--model mlp|convnet] [--steps 400] [--ranks 1 2 4] [--rounds 3]

Throughput is distrain's own samples/s over the steady-state log windows (first window
dropped), median over rounds, each round a fresh torchrun. With more ranks than cores
(4 on a 2-core machine) the figure measures oversubscription, not the launcher.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"mlp": ["model.name=mlp", "model.hidden=[256,256]"], "convnet": ["model.name=cnn"]}


def throughput(model: str, ranks: int, steps: int, per_rank: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        base = Path(d) / "base.yaml"  # the demo's data, no model section: the model comes from MODELS
        base.write_text("data: {name: digits}\noptim: {name: adamw}\n")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "distrain.train", "--config", str(base), *MODELS[model],
               f"run.dir={d}/run", "train.epochs=null", f"train.max_steps={steps}", "train.log_every=50",
               "train.eval_every=0", "checkpoint.every_steps=0", "strategy.name=ddp",
               f"data.global_batch_size={per_rank * ranks}", "log.level=warning"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        rows = [json.loads(line) for line in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
        windows = [r["samples_per_s"] for r in rows if r["split"] == "train" and r["step"] % 50 == 0][1:]
        return statistics.median(windows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=list(MODELS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--per-rank-batch", type=int, default=64)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    results = {n: [] for n in a.ranks}
    for _ in range(a.rounds):  # interleaved: 1 2 4 1 2 4 ...
        for n in a.ranks:
            results[n].append(throughput(a.model, n, a.steps, a.per_rank_batch))
    base = statistics.median(results[a.ranks[0]]) / a.ranks[0]
    print(f"weak scaling, {a.model}, {a.per_rank_batch} samples per rank per step, gloo, 1 thread per rank")
    for n in a.ranks:
        med = statistics.median(results[n])
        print(f"  {n} rank(s): {med:9.0f} samples/s (min {min(results[n]):.0f}, max {max(results[n]):.0f}); "
              f"efficiency {med / (n * base):.3f}")


if __name__ == "__main__":
    main()
