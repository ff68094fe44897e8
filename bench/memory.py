"""Model-state memory per rank against the ZeRO accounting of docs/SCALING.md, from CPU RSS.

    python bench/memory.py [--hidden 2048 --layers 4] [--steps 4]

Each case runs twice under one torchrun with 2 gloo ranks (1 for `single`): with a wide MLP
whose fp32 model states dominate, and with a tiny one; the difference of rank 0's peak RSS
is what the wide model's states, activations and buffers cost. fp32 AdamW: 4 bytes of
weights, 4 of gradients, 8 of moments per parameter.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
# name, ranks, overrides, expected bytes per parameter on a rank (N ranks)
CASES = [
    ("single", 1, ["strategy.name=single"], lambda n: 16),
    ("ddp", 2, ["strategy.name=ddp"], lambda n: 16),
    ("ZeRO-1", 2, ["strategy.name=deepspeed", "strategy.zero_stage=1"], lambda n: 8 + 8 / n),
    ("ZeRO-2", 2, ["strategy.name=deepspeed", "strategy.zero_stage=2"], lambda n: 4 + 12 / n),
    ("ZeRO-3", 2, ["strategy.name=deepspeed", "strategy.zero_stage=3"], lambda n: 16 / n),
    ("fsdp", 2, ["strategy.name=fsdp"], lambda n: 16 / n),
]


def peak_mb(ranks: int, overrides: list[str], hidden: list[int], steps: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "distrain.train", "--config", str(ROOT / "configs" / "digits_mlp.yaml"), *overrides,
               f"model.hidden={json.dumps(hidden)}", f"run.dir={d}/run", "train.epochs=null",
               f"train.max_steps={steps}", "train.log_every=1", "train.eval_every=0", "checkpoint.every_steps=0",
               "optim.name=adamw", "log.level=warning"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        rows = [json.loads(line) for line in (Path(d) / "run" / "metrics.jsonl").read_text().splitlines()]
        return max(r["peak_memory_mb"] for r in rows if r["split"] == "train")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args()
    wide = [a.hidden] * a.layers
    params = 64 * a.hidden + (a.layers - 1) * a.hidden ** 2 + a.hidden * 10 + a.hidden * a.layers + 10
    print(f"MLP 64-{'-'.join(map(str, wide))}-10: {params / 1e6:.2f} M parameters, fp32 AdamW, rank 0's peak RSS")
    print(f"{'case':<8} {'ranks':>5} {'measured MB':>12} {'model states MB':>16} {'ratio':>6}")
    for name, ranks, overrides, per_param in CASES:
        measured = peak_mb(ranks, overrides, wide, a.steps) - peak_mb(ranks, overrides, [16], a.steps)
        expected = per_param(ranks) * params / 2**20
        print(f"{name:<8} {ranks:>5} {measured:12.0f} {expected:16.0f} {measured / expected:6.2f}", flush=True)


if __name__ == "__main__":
    main()
