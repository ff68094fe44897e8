"""Weak scaling on CPU gloo, one thread per rank: the per-rank batch stays fixed and the
global batch grows with the world size; efficiency = throughput(N) / (N x throughput(1)).

    python bench/scaling.py [--model mlp|convnet] [--steps 400] [--ranks 1 2 4] [--rounds 3]

Throughput is distrain's own samples/s over the steady-state log windows (the loop's wall
time, log lines included; first window dropped), median over rounds, each round a fresh
torchrun. The ceiling runs the same number of single-process trainings side by side without
communicating: what the machine allows before any all-reduce. Beside it, how much slower
the slowest rank's own work (data + forward, the same on every rank) ran than the
fastest's: what unequal cores cost a job whose ranks wait for each other every step. With
more ranks than cores (4 on a 2-core machine) the figure measures oversubscription, not
the launcher.
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
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
MODELS = {"mlp": ["model.name=mlp", "model.hidden=[256,256]"], "convnet": ["model.name=cnn"]}


def independent(model: str, ranks: int, steps: int, per_rank: int) -> float:
    """The machine's ceiling: `ranks` one-rank runs at once (each its own group), no communication between them."""
    with tempfile.TemporaryDirectory() as d:
        procs = [subprocess.Popen(command(model, 1, steps, per_rank, f"{d}/{i}", "ddp"), env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(ranks)]
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(proc.stderr.read().decode()[-2000:])
        return sum(window_median(Path(d) / str(i)) for i in range(ranks))


def command(model: str, ranks: int, steps: int, per_rank: int, d: str, strategy: str) -> list[str]:
    base = Path(d) / "base.yaml"  # the demo's data, no model section: the model comes from MODELS
    base.parent.mkdir(parents=True, exist_ok=True)
    base.write_text("data: {name: digits}\noptim: {name: adamw}\n")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "distrain.train", "--config", str(base), *MODELS[model],
            f"run.dir={d}/run", "train.epochs=null", f"train.max_steps={steps}", "train.log_every=50",
            "train.eval_every=0", "checkpoint.every_steps=0", f"strategy.name={strategy}",
            f"data.global_batch_size={per_rank * ranks}", "log.level=warning"]


def windows(d: Path) -> list[dict]:
    """The steady-state log windows (the first one, warm-up, dropped)."""
    rows = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train" and r["step"] % 50 == 0][1:]


def window_median(d: Path) -> float:
    return statistics.median([r["samples_per_s"] for r in windows(d)])


def spread(d: Path) -> float:
    """Median over windows of the slowest rank's own time per step (data + forward) over the
    fastest's: every rank waits for the slowest, so equal work on unequal cores costs this much."""
    return statistics.median([r["busy_max_s"] / r["busy_min_s"] for r in windows(d)])


def throughput(model: str, ranks: int, steps: int, per_rank: int) -> tuple[float, float | None]:
    """(samples/s, the ranks' spread; None on one rank)."""
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(command(model, ranks, steps, per_rank, d, "ddp"), check=True, capture_output=True, env=ENV)
        return window_median(Path(d)), spread(Path(d)) if ranks > 1 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=list(MODELS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--per-rank-batch", type=int, default=64)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    results = {n: [] for n in a.ranks}
    ceiling = {n: [] for n in a.ranks if n > 1}
    spreads = {n: [] for n in a.ranks}
    for _ in range(a.rounds):  # interleaved: 1 2 4 1 2 4 ...
        for n in a.ranks:
            samples_per_s, ranks_spread = throughput(a.model, n, a.steps, a.per_rank_batch)
            results[n].append(samples_per_s)
            spreads[n].append(ranks_spread)
            if n > 1:
                ceiling[n].append(independent(a.model, n, a.steps, a.per_rank_batch))
    base = statistics.median(results[a.ranks[0]]) / a.ranks[0]
    print(f"weak scaling, {a.model}, {a.per_rank_batch} samples per rank per step, gloo, 1 thread per rank")
    for n in a.ranks:
        med = statistics.median(results[n])
        print(f"  {n} rank(s): {med:9.0f} samples/s (min {min(results[n]):.0f}, max {max(results[n]):.0f}); "
              f"efficiency {med / (n * base):.3f}" + (f"; ceiling (independent processes, no communication) "
                                                      f"{statistics.median(ceiling[n]) / (n * base):.3f}" if n > 1 else ""))
    # the machine drifts between rounds: each round's N-rank run against that round's one-rank run
    one = a.ranks[0]
    for n in a.ranks[1:]:
        eff = [r / (n * b / one) for r, b in zip(results[n], results[one])]
        cap = [c / (n * b / one) for c, b in zip(ceiling[n], results[one])]
        print(f"  {n} ranks, paired per round: efficiency {statistics.median(eff):.3f} "
              f"({' '.join(f'{e:.2f}' for e in eff)}), ceiling {statistics.median(cap):.3f} "
              f"({' '.join(f'{c:.2f}' for c in cap)}); slowest rank's data+forward over the fastest's "
              f"{statistics.median(spreads[n]):.3f} ({' '.join(f'{x:.2f}' for x in spreads[n])})")

if __name__ == "__main__":
    main()
