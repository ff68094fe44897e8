"""Plot recorded overhead results: step time of each loop relative to the hand-written one.

    python bench/chart.py docs/benchmarks.json docs/benchmarks.png

The JSON is what `bench/overhead.py CASE --json FILE` appends: per case, per loop, the
median ratio over rounds with its min-max.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOOPS = ["distrain", "fabric", "accelerate", "distrain-gloo", "hand-again"]


def main(src: str, out: str) -> None:
    records = {r["case"]: r for r in json.loads(Path(src).read_text())}  # the newest run of each case
    cases = list(records)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    width = 0.8 / len(LOOPS)
    for i, loop in enumerate(LOOPS):
        xs, ys, lo, hi = [], [], [], []
        for c, case in enumerate(cases):
            r = records[case]["loops"].get(loop)
            if r:
                xs.append(c + (i - (len(LOOPS) - 1) / 2) * width)
                ys.append(r["ratio"])
                lo.append(r["ratio"] - r["min"])
                hi.append(r["max"] - r["ratio"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=loop)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("step time / hand-written loop")
    lowest = min(r["min"] for rec in records.values() for name, r in rec["loops"].items() if name in LOOPS)
    ax.set_ylim(min(0.8, lowest - 0.05), max(1.4, ax.get_ylim()[1]) + 0.1)
    ax.set_title("Training-loop overhead (median of interleaved rounds, min-max bars)")
    ax.legend(loc="upper center", ncol=len(LOOPS), fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
