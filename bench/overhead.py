"""distrain, Lightning Fabric and Accelerate against a hand-written PyTorch loop: same
model, data, sample order, init, optimizer and seed.

    python bench/overhead.py single [--model mlp|convnet] [--rounds 7] [--steps 1000]
    python bench/overhead.py ddp [--rounds 7] [--steps 600]      # 2 gloo ranks, a torchrun per loop
    python bench/overhead.py startup [--rounds 7]                # import, and launch to first step
    python bench/overhead.py import [--rounds 15]                # distrain's modules after torch
    ... [--loops hand hand-again distrain fabric accelerate distrain-gloo]  # default: every installed one

Method, single: a round starts one fresh process per loop, and the loops take turns by
windows of 25 steps (bench/relay.py: A B C D, then B C D A, ...), so loops compared in one
cycle ran within ~100 ms of each other; one thread per process, all on the same core. The
hand-written loop runs twice (hand-again: its ratio is the noise floor). A loop's ratio is its window
mean over the hand-written loop's in the same cycle: the printed figure is the median over
all cycles after two warm-up cycles, with the min-max of the rounds' medians; step times are
medians of window means. A window covers everything a loop does from one iteration's top
to the next (distrain: its whole training loop, a log line every 25 steps included).
Method, ddp: a round is one fresh torchrun that runs every loop once, one after the other,
the order rotating between rounds, so drift and order effects cancel; step times are
medians of 25-step window means after warm-up; the ratio is the median over rounds of each
loop's time / the hand-written loop's time in the same round, with its min-max.
Peak memory (single case) is measured apart, one fresh process per loop: its peak RSS,
imports included. Final weights are compared bit for bit with the hand-written loop's.
Start-up runs a fresh process per loop. Run it on a quiet machine.
bench/whole_process.py measures the same step another way: whole fresh processes, short and long runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
TARGETS = {"single": 1.01, "ddp": 1.02}
WARMUP_CYCLES = 2


def loop_worker(kind: str, loops: list[str], model: str, steps: int, batch: int, tmp: str) -> None:
    """Runs the loops one after the other in this process (timing) and saves their weights."""
    import torch

    torch.set_num_threads(1)
    from bench.common import steady
    from bench.peers import LOOPS

    ddp = kind == "ddp"
    if ddp:
        import distrain.dist

        torch.distributed.init_process_group("gloo")
        distrain.dist.shutdown = lambda: None  # keep this process's group for the loops after distrain's
    result = {}
    for loop in loops:
        gc.collect()  # the previous loop's model, optimizer and DDP reducer are gone before this one starts
        windows, weights = LOOPS[loop](model, steps, batch, ddp=ddp)
        result[loop] = steady(windows)
        if not ddp or torch.distributed.get_rank() == 0:
            torch.save(weights, Path(tmp) / f"{loop}.pt")
    if not ddp or torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


def relay_worker(loop: str, model: str, steps: int, batch: int, tmp: str) -> None:
    """One loop in this process, taking turns with the others' processes (bench/relay.py)."""
    import torch

    torch.set_num_threads(1)
    from bench.peers import LOOPS
    from bench.relay import Baton

    baton = Baton.from_env()
    _, weights = LOOPS[loop](model, steps, batch, tick=baton.tick)
    baton.finish()
    torch.save(weights, Path(tmp) / f"{loop}.pt")
    print("RESULT " + json.dumps(baton.windows), flush=True)


def memory_worker(loop: str, model: str, steps: int, batch: int) -> None:
    """One loop alone in a fresh process: its peak RSS, imports included."""
    import torch

    torch.set_num_threads(1)
    from bench.peers import LOOPS

    LOOPS[loop](model, steps, batch)
    print("RESULT " + json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), flush=True)


def startup_worker(loop: str, model: str, launched: float) -> None:
    """Launch -> first optimizer step done, with the imports timed on the way."""
    started = time.time()
    import importlib

    import torch

    torch.set_num_threads(1)
    torch_done = time.time()
    from bench.peers import IMPORTS, LOOPS

    importlib.import_module(IMPORTS[loop])
    library_done = time.time()

    def report():
        now = time.time()
        print("RESULT " + json.dumps({"interpreter": started - launched, "torch": torch_done - started,
                                      "library": library_done - torch_done, "first_step": now - launched}), flush=True)
        os._exit(0)

    if loop == "distrain":  # its loop runs to the end: stop it after the first step
        from distrain.trainer import Trainer

        train_step = Trainer.train_step
        Trainer.train_step = lambda self: (train_step(self), report())
    LOOPS[loop](model, 1, 64)
    report()


def result_of(cmd: list[str]):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{' '.join(cmd[-8:])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def run_round(kind: str, order: list[str], model: str, steps: int, batch: int, tmp: Path) -> dict:
    if kind == "startup":  # a fresh process per loop: start-up is what is measured
        return {loop: result_of([sys.executable, __file__, "_startup", loop, model, repr(time.time())])
                for loop in order}
    import torch

    from bench.common import same_weights

    if kind == "single":
        from bench.relay import WINDOW, paired_ratios, run_relay

        windows = run_relay({loop: [sys.executable, __file__, "_relay", loop, model, str(steps), str(batch), str(tmp)]
                             for loop in order}, steps // WINDOW, ENV)
        ratios = paired_ratios(windows, "hand", skip=WARMUP_CYCLES)
        hand = torch.load(tmp / "hand.pt", weights_only=True)
        return {loop: {"step_s": statistics.median(windows[loop][WARMUP_CYCLES:]), "ratios": ratios[loop],
                       "same_weights": same_weights(hand, torch.load(tmp / f"{loop}.pt", weights_only=True))}
                for loop in order}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    times = result_of([*launcher, __file__, "_loops", kind, ",".join(order), model, str(steps), str(batch), str(tmp)])

    hand = torch.load(tmp / "hand.pt", weights_only=True)
    return {loop: {"step_s": times[loop], "ratios": [times[loop] / times["hand"]],
                   "same_weights": same_weights(hand, torch.load(tmp / f"{loop}.pt", weights_only=True))}
            for loop in order}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def summary(loops: list[str], rounds: list[dict], peaks: dict) -> dict:
    """Per loop: median step time, ratio to the hand-written loop with its min-max, peak RSS, weights."""
    out = {}
    for loop in loops:
        pooled, per_round = ratios_of(rounds, loop)
        out[loop] = {"step_ms": statistics.median(r[loop]["step_s"] for r in rounds) * 1e3,
                     "ratio": statistics.median(pooled), "min": min(per_round), "max": max(per_round),
                     "peak_mb": peaks.get(loop), "same_weights": sum(r[loop]["same_weights"] for r in rounds),
                     "rounds": len(rounds)}
    return out


def ratios_of(rounds: list[dict], loop: str) -> tuple[list[float], list[float]]:
    """(every paired ratio of every round, each round's median ratio)."""
    pooled = [x for r in rounds for x in r[loop]["ratios"]]
    return pooled, [statistics.median(r[loop]["ratios"]) for r in rounds]


def report_loops(kind: str, loops: list[str], rounds: list[dict], peaks: dict) -> None:
    print(f"{'loop':<11} {'step ms':>8} {'ratio (rounds min-max)':>26} {'peak RSS MB':>12}  weights = hand")
    for loop in loops:
        pooled, per_round = ratios_of(rounds, loop)
        step_ms = statistics.median(r[loop]["step_s"] for r in rounds) * 1e3
        peak = f"{peaks[loop]:.0f}" if loop in peaks else "-"
        same = sum(r[loop]["same_weights"] for r in rounds)
        ratio = f"{statistics.median(pooled):.4f} ({min(per_round):.4f}-{max(per_round):.4f})"
        print(f"{loop:<11} {step_ms:8.3f} {ratio:>26} {peak:>12}  {same}/{len(rounds)}")
    if "distrain" not in loops:
        return
    ours = statistics.median(ratios_of(rounds, "distrain")[0])
    target = TARGETS[kind]
    print(f"distrain target <= {target}: {'met' if ours <= target else 'MISSED'} ({ours:.4f})")


def report_startup(loops: list[str], rounds: list[dict]) -> None:
    print(f"{'loop':<11} {'interpreter s':>14} {'torch s':>9} {'library s':>10} {'launch to first step s':>23}")
    for loop in loops:
        med = {k: statistics.median(r[loop][k] for r in rounds) for k in ("interpreter", "torch", "library", "first_step")}
        first = spread([r[loop]["first_step"] for r in rounds])
        print(f"{loop:<11} {med['interpreter']:14.3f} {med['torch']:9.3f} {med['library']:10.3f} {first:>23}")


def import_time(n: int) -> list[float]:
    code = ("import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
            "import distrain.train, distrain.trainer, distrain.checkpoint, distrain.strategies.replicated; "
            "print(t1 - t0, time.perf_counter() - t1)")
    return [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                                 check=True).stdout.split()[1]) for _ in range(n)]


def main() -> None:
    if sys.argv[1:2] == ["_loops"]:
        kind, loops, model, steps, batch, tmp = sys.argv[2:8]
        return loop_worker(kind, loops.split(","), model, int(steps), int(batch), tmp)
    if sys.argv[1:2] == ["_relay"]:
        loop, model, steps, batch, tmp = sys.argv[2:7]
        return relay_worker(loop, model, int(steps), int(batch), tmp)
    if sys.argv[1:2] == ["_memory"]:
        return memory_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    if sys.argv[1:2] == ["_startup"]:
        return startup_worker(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    from bench.peers import available

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=["single", "ddp", "startup", "import"])
    p.add_argument("--model", default="mlp", choices=["mlp", "convnet"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=1000, help="a multiple of 25")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--loops", nargs="+", choices=["hand", "hand-again", "distrain", "fabric", "accelerate", "distrain-gloo"],
                   help="default: every installed one; for single also hand-again (the hand-written loop against "
                        "itself: the noise floor), for ddp distrain-gloo (its all-reduce on gloo's TCP path)")
    p.add_argument("--json", type=Path, help="append the summary to this JSON list (bench/chart.py plots it)")
    args = p.parse_args()
    if args.case == "import":
        extra = import_time(args.rounds)
        print(f"import of distrain's training modules after torch: median {statistics.median(extra):.4f} s "
              f"(min {min(extra):.4f}, max {max(extra):.4f}; target <= 0.10 s)")
        return
    chosen = args.loops or available() + {"ddp": ["distrain-gloo"], "single": ["hand-again"]}.get(args.case, [])
    loops = ["hand"] + [x for x in chosen if x != "hand"]
    print(f"{args.case} / {args.model}, batch {args.batch}, {args.steps} steps, {args.rounds} rounds, loops {loops}")
    rounds = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.rounds):
            order = loops[i % len(loops):] + loops[:i % len(loops)]
            rounds.append(run_round(args.case, order, args.model, args.steps, args.batch, Path(d)))
            key, unit = ("first_step", "s") if args.case == "startup" else ("step_s", "ms")
            scale = 1 if unit == "s" else 1e3
            print(f"  round {i}: " + "  ".join(
                f"{k} {v[key] * scale:.3f} {unit}" + (f" ({statistics.median(v['ratios']):.3f})" if "ratios" in v else "")
                for k, v in rounds[-1].items()), flush=True)
    if args.case == "startup":
        return report_startup(loops, rounds)
    peaks = {loop: result_of([sys.executable, __file__, "_memory", loop, args.model, "200", str(args.batch)])
             for loop in loops} if args.case == "single" else {}
    report_loops(args.case, loops, rounds, peaks)
    if args.json:
        records = json.loads(args.json.read_text()) if args.json.exists() else []
        records.append({"case": f"{args.case}/{args.model}" if args.case == "single" else args.case,
                        "date": time.strftime("%Y-%m-%d"), "loops": summary(loops, rounds, peaks)})
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
