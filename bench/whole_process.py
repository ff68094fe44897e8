"""distrain's training step against a plain hand-written PyTorch loop, measured as a user
sees it: whole fresh processes, each timed from launch to exit.

    python bench/whole_process.py single [--model mlp|convnet] [--pairs 5] [--short 300] [--long 6300] [--log-every 10]
    python bench/whole_process.py ddp [--pairs 5] ...     # 2 gloo ranks under torchrun each
    ... [--batch 64] [--json FILE] [--roomy-malloc]

Method: every measurement is one fresh process (`python -m distrain.train --config
configs/digits_mlp.yaml ...`, or the hand-written loop), pinned to one core (ddp: two) and
timed by this process from launch to exit. After one warm-up run per loop come `--pairs`
pairs of a short and a long run per loop, interleaved (hand short, distrain short, hand long,
distrain long; the order rotating by one per pair). A loop's step time is (median long wall -
median short wall) / (long - short): start-up, imports, data building, the final evaluation
and export are the same in both runs and cancel. Its spread is the min-max over pairs of each
pair's own difference. Also printed: the long runs' whole wall time (what a user waits for),
the peak RSS of the largest process of a run (wait4's rusage), and whether each long run's
final weights are bit-identical to the hand-written loop's of the same pair.
bench/overhead.py measures the same step by another method: loops taking turns by 25-step
windows inside running processes.

The hand-written loop is the plain one: zero_grad(set_to_none=True), forward, F.cross_entropy,
backward(), AdamW.step() in torch's default form, loss.item() every --log-every steps; for ddp
the model is wrapped in DistributedDataParallel on gloo. Data, sample order, init and seed are
distrain's (bench/common.py); weight decay is 0 in both (the reviewed configuration).
distrain's processes end without the interpreter's teardown (os._exit), the single hand loop's
with it, as a plain script does: the teardown's time and pages count in the whole-run wall time
and the peak RSS, not in the step time. The ddp hand loop ends like distrain's (see hand_loop).
Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
# glibc keeps freed memory instead of returning it page by page (docs: malloc page faults moved a loop by 20%)
ROOMY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824",
                "MALLOC_TOP_PAD_": "268435456"}
SEED, LR, WEIGHT_DECAY = 0, 1e-3, 0.0
LOOPS = ("hand", "distrain")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DISTRAIN_MODEL = {"mlp": ["model.hidden=[256,256]"], "convnet": ["model={name: cnn}"]}


def hand_loop(model_name: str, steps: int, batch: int, log_every: int, out: str, ddp: bool) -> None:
    """The loop a user writes by hand; rank 0 saves the final weights to `out`."""
    import torch
    import torch.nn.functional as F

    from bench.common import MODELS
    from distrain.data.datasets import digits
    from distrain.data.sampler import epoch_permutation, even_slice

    if ddp:
        torch.distributed.init_process_group("gloo")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    torch.manual_seed(SEED)
    model = MODELS[model_name][0]()
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x, y = digits()[0].tensors
    n, epoch, pos = len(x), 0, 0
    perm = epoch_permutation(n, SEED, epoch)
    for step in range(1, steps + 1):
        if pos >= n:
            epoch, pos = epoch + 1, 0
            perm = epoch_permutation(n, SEED, epoch)
        size = min(batch, n - pos)
        lo, hi = even_slice(size, world, rank)
        idx = perm[pos : pos + size][lo:hi]
        pos += size
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        if len(idx) * world != size:  # the epoch's short last batch splits unevenly: weight by share
            loss = loss * (len(idx) * world / size)
        loss.backward()
        opt.step()
        if step % log_every == 0:
            loss.item()
    if rank == 0:
        torch.save(model.state_dict(), out)
    if ddp:
        torch.distributed.destroy_process_group()
        # as distrain does: gloo's worker threads can outlive the group into the interpreter's
        # teardown and abort the process after a finished run
        sys.stdout.flush()
        os._exit(0)


def command(loop: str, case: str, model: str, steps: int, batch: int, log_every: int, run_dir: Path) -> list[str]:
    launcher = TORCHRUN if case == "ddp" else [sys.executable]
    if loop == "hand":
        return [*launcher, __file__, "_hand", model, str(steps), str(batch), str(log_every), str(run_dir / "hand.pt"),
                case]
    return [*launcher, "-m", "distrain.train", "--config", str(ROOT / "configs" / "digits_mlp.yaml"),
            *DISTRAIN_MODEL[model], f"strategy.name={case}", f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY:g}",
            "sched.name=constant", "sched.warmup_steps=0", "train.epochs=null", "train.eval_every=0",
            "checkpoint.every_steps=0", "log.progress=off", f"train.max_steps={steps}", f"train.log_every={log_every}",
            f"data.global_batch_size={batch}", f"run.seed={SEED}", f"run.dir={run_dir}"]


def timed(cmd: list[str], cpus: set[int], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds from launch to exit, peak RSS in MB of the largest process of the run)."""
    with log.open("w") as out:
        started = time.perf_counter()
        pinned = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]  # taskset execs: the pid is the run's
        proc = subprocess.Popen(pinned, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage, not every child's so far
        wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
    return wall, usage.ru_maxrss / 1024


def final_weights(loop: str, run_dir: Path):
    import torch

    path = run_dir / ("hand.pt" if loop == "hand" else "final/model.pt")
    return torch.load(path, weights_only=True)


def pair_order(pair: int, short: int, long: int) -> list[tuple[str, int]]:
    runs = [(loop, steps) for steps in (short, long) for loop in LOOPS]
    return runs[pair % len(runs):] + runs[:pair % len(runs)]


def measure(args, cpus: set[int], env: dict, tmp: Path) -> tuple[list[dict], list[bool]]:
    """Every run's record (pair -1: the warm-up), and per pair whether the long runs' weights match."""
    from bench.common import same_weights

    records, same = [], []
    plan = [(-1, loop, args.short) for loop in LOOPS]
    plan += [(i, loop, steps) for i in range(args.pairs) for loop, steps in pair_order(i, args.short, args.long)]
    weights = {}
    for pair, loop, steps in plan:
        run_dir = tmp / f"{loop}-{pair}-{steps}"
        cmd = command(loop, args.case, args.model, steps, args.batch, args.log_every, run_dir)
        run_dir.mkdir()
        wall, peak = timed(cmd, cpus, env, tmp / "child.log")
        if steps == args.long and pair >= 0:
            weights[pair, loop] = final_weights(loop, run_dir)
        shutil.rmtree(run_dir)
        records.append({"pair": pair, "loop": loop, "steps": steps, "wall_s": wall, "peak_rss_mb": peak})
        print(f"  pair {pair:>2} {loop:<8} {steps:>6} steps  {wall:8.3f} s  {peak:6.0f} MB", flush=True)
        if all((pair, name) in weights for name in LOOPS):
            same.append(same_weights(weights.pop((pair, "hand")), weights.pop((pair, "distrain"))))
    return records, same


def walls(records: list[dict], loop: str, steps: int) -> list[float]:
    return [r["wall_s"] for r in sorted(records, key=lambda r: r["pair"])
            if r["pair"] >= 0 and r["loop"] == loop and r["steps"] == steps]


def summarise(records: list[dict], short: int, long: int) -> dict:
    out, span = {}, long - short
    for loop in LOOPS:
        s, lg = walls(records, loop, short), walls(records, loop, long)
        out[loop] = {"step_ms": (statistics.median(lg) - statistics.median(s)) / span * 1e3,
                     "pair_step_ms": [(b - a) / span * 1e3 for a, b in zip(s, lg)],
                     "short_s": statistics.median(s), "long_s": statistics.median(lg),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in records if r["loop"] == loop)}
    hand, ours = out["hand"], out["distrain"]
    out["ratio"] = {"step": ours["step_ms"] / hand["step_ms"],
                    "pair_step": [d / h for d, h in zip(ours["pair_step_ms"], hand["pair_step_ms"])],
                    "long_run": ours["long_s"] / hand["long_s"]}
    return out


def report(summary: dict, same: list[bool]) -> None:
    print(f"{'loop':<9} {'step ms (pairs min-max)':>26} {'short run s':>12} {'long run s':>11} {'peak RSS MB':>12}")
    for loop in LOOPS:
        row = summary[loop]
        step = f"{row['step_ms']:.4f} ({min(row['pair_step_ms']):.4f}-{max(row['pair_step_ms']):.4f})"
        print(f"{loop:<9} {step:>26} {row['short_s']:12.3f} {row['long_s']:11.3f} {row['peak_rss_mb']:12.0f}")
    ratio = summary["ratio"]
    print(f"distrain / hand: step {ratio['step']:.4f} (pairs {min(ratio['pair_step']):.4f}-"
          f"{max(ratio['pair_step']):.4f}), whole long run {ratio['long_run']:.4f}")
    print(f"long runs' final weights bit-identical to the hand-written loop's: {sum(same)}/{len(same)}")


def main() -> None:
    if sys.argv[1:2] == ["_hand"]:
        model, steps, batch, log_every, out, case = sys.argv[2:8]
        return hand_loop(model, int(steps), int(batch), int(log_every), out, ddp=case == "ddp")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=["single", "ddp"])
    p.add_argument("--model", default="mlp", choices=sorted(DISTRAIN_MODEL))
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--short", type=int, default=300)
    p.add_argument("--long", type=int, default=6300)
    p.add_argument("--log-every", type=int, default=10, help="distrain's train.log_every; the hand loop's loss.item()")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--roomy-malloc", action="store_true", help="children run with glibc malloc keeping freed memory "
                   "(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_): report with and without")
    p.add_argument("--json", type=Path, help="write every run's wall time and the summary to this file")
    args = p.parse_args()
    if not 0 < args.short < args.long or args.pairs < 1 or args.log_every < 1:
        p.error("need 0 < --short < --long, --pairs >= 1 and --log-every >= 1")
    if shutil.which("taskset") is None:
        p.error("needs taskset (util-linux) to pin the runs to cores")
    available = sorted(os.sched_getaffinity(0))
    cpus = set(available[:1] if args.case == "single" else available[:2])
    env = {**ENV, **ROOMY_MALLOC} if args.roomy_malloc else ENV
    print(f"{args.case} / {args.model}: batch {args.batch}, {args.short} and {args.long} steps, loss read every "
          f"{args.log_every} steps, {args.pairs} pairs, pinned to CPU {sorted(cpus)}"
          f"{', roomy malloc' if args.roomy_malloc else ''}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        records, same = measure(args, cpus, env, Path(d))
    summary = summarise(records, args.short, args.long)
    report(summary, same)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({**settings, "cpus": sorted(cpus), "date": time.strftime("%Y-%m-%d %H:%M"),
                                         "runs": records, "same_weights": same, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
