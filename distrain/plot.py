"""`distrain plot RUN_DIR [RUN_DIR ...] --out curves.png`: training loss, eval accuracy
(or eval loss) and throughput of one or more runs, overlaid."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run_dirs: list[Path], out: Path, width_px: int = 1500, height_px: int = 450) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(1, 3, figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        train = [r for r in rows if r.get("split") == "train"]
        evals = [r for r in rows if r.get("split") == "eval"]
        label = Path(run_dir).name if Path(run_dir).name != "run" else str(run_dir)
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        key = "accuracy" if evals and "accuracy" in evals[0] else "loss"
        axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=label)
        axes[1].set_ylabel(f"eval {key}")
        axes[2].plot([r["step"] for r in train], [r["samples_per_s"] for r in train], label=label)
    axes[0].set_ylabel("train loss")
    axes[2].set_ylabel("samples / s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="distrain plot", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="run directories (holding metrics.jsonl)")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write")
    args = p.parse_args(argv)
    try:
        plot(args.runs, args.out)
    except FileNotFoundError as e:
        print(f"distrain plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0
