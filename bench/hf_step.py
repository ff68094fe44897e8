"""distrain's training step against a hand-written loop on a Hugging Face model, measured as
a user sees it: whole fresh processes, each timed from launch to exit.

    python bench/hf_step.py single [--pairs 5] [--short 100] [--long 2100] [--log-every 10] [--batch 16]
    python bench/hf_step.py ddp ...     # 2 gloo ranks under torchrun each
    ... [--json FILE] [--roomy-malloc]

The model: a small Llama-style causal LM (transformers' LlamaForCausalLM from an inline
config: hidden 128, 2 layers, 4 heads, vocabulary 512) with random weights from run.seed, on
synthetic fixed-length token rows of 64 (bench/hf_data.py): no padding, every label counts.

Method, pairing, printout: bench/whole_process.py's (read its docstring): after one warm-up
run per loop, --pairs interleaved pairs of a short and a long run per loop; a loop's step
time is (median long wall - median short wall) / (long - short). Also printed: whether each
pair's long runs end with bit-identical weights, and the largest absolute difference.

The hand-written loop: the model built as distrain builds it (torch.manual_seed(run.seed),
then AutoModelForCausalLM.from_config with use_cache off), distrain's sample order
(distrain.data.sampler), AdamW in the multi-tensor form with distrain's defaults (as
distrain.optim builds it: same arithmetic on the CPU), zero_grad(set_to_none=True),
`loss = model(**batch).loss` (transformers' mean over the batch's labels), backward(), step(),
loss.item() every --log-every steps; for ddp the model is wrapped in DistributedDataParallel
on gloo. distrain's own loss is the token-level sum / global count, which equals that mean
here; the two formulations can still round differently in the last bit.
Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import whole_process as method

SEED, LR, N_TRAIN, N_EVAL = 0, 1e-3, 2048, 32
LLAMA = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def hand_loop(steps: int, batch: int, log_every: int, out: str, ddp: bool) -> None:
    """The loop a user writes by hand; rank 0 saves the final weights to `out`."""
    import torch
    import transformers

    from bench.hf_data import token_rows
    from distrain.data.sampler import epoch_permutation, even_slice

    if ddp:
        torch.distributed.init_process_group("gloo")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    torch.manual_seed(SEED)
    ids = token_rows(N_TRAIN + N_EVAL)[:N_TRAIN]
    config = dict(LLAMA)
    config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    config.use_cache = False
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, foreach=True)
    n, epoch, pos = len(ids), 0, 0
    perm = epoch_permutation(n, SEED, epoch)
    for step in range(1, steps + 1):
        if pos >= n:
            epoch, pos = epoch + 1, 0
            perm = epoch_permutation(n, SEED, epoch)
        lo, hi = even_slice(batch, world, rank)  # --batch divides the rows: every batch is full
        rows = ids[perm[pos : pos + batch][lo:hi]]
        pos += batch
        opt.zero_grad(set_to_none=True)
        loss = net(input_ids=rows, labels=rows).loss
        loss.backward()
        opt.step()
        if step % log_every == 0:
            loss.item()
    if rank == 0:
        torch.save(model.state_dict(), out)
    if ddp:
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # as distrain does (bench/whole_process.py's hand_loop says why)


def write_config(path: Path, batch: int) -> Path:
    import yaml

    cfg = {"run": {"seed": SEED}, "model": {"name": "hf", "config": LLAMA},
           "data": {"name": "bench.hf_data:lm_tokens", "n_train": N_TRAIN, "n_eval": N_EVAL,
                    "global_batch_size": batch, "eval_batch_size": N_EVAL},
           "optim": {"name": "adamw", "lr": LR, "weight_decay": 0.0}, "sched": {"name": "constant", "warmup_steps": 0},
           "train": {"epochs": None, "eval_every": 0}, "checkpoint": {"every_steps": 0}, "log": {"progress": "off"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def command(loop: str, case: str, config: Path, steps: int, batch: int, log_every: int, run_dir: Path) -> list[str]:
    launcher = method.TORCHRUN if case == "ddp" else [sys.executable]
    if loop == "hand":
        return [*launcher, __file__, "_hand", str(steps), str(batch), str(log_every), str(run_dir / "hand.pt"), case]
    return [*launcher, "-m", "distrain.train", "--config", str(config), f"strategy.name={case}",
            f"train.max_steps={steps}", f"train.log_every={log_every}", f"run.dir={run_dir}"]


def max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def measure(args, cpus: set[int], env: dict, tmp: Path) -> tuple[list[dict], list[bool], list[float]]:
    """Every run's record (pair -1: the warm-up), and per pair whether the long runs' weights
    match and their largest absolute difference."""
    import torch

    config = write_config(tmp / "hf_step.yaml", args.batch)
    records, same, diffs, weights = [], [], [], {}
    plan = [(-1, loop, args.short) for loop in method.LOOPS]
    plan += [(i, loop, steps) for i in range(args.pairs) for loop, steps in method.pair_order(i, args.short, args.long)]
    for pair, loop, steps in plan:
        run_dir = tmp / f"{loop}-{pair}-{steps}"
        run_dir.mkdir()
        cmd = command(loop, args.case, config, steps, args.batch, args.log_every, run_dir)
        wall, peak = method.timed(cmd, cpus, env, tmp / "child.log")
        if steps == args.long and pair >= 0:
            weights[pair, loop] = torch.load(run_dir / ("hand.pt" if loop == "hand" else "final/model.pt"),
                                             weights_only=True)
        shutil.rmtree(run_dir)
        records.append({"pair": pair, "loop": loop, "steps": steps, "wall_s": wall, "peak_rss_mb": peak})
        print(f"  pair {pair:>2} {loop:<8} {steps:>6} steps  {wall:8.3f} s  {peak:6.0f} MB", flush=True)
        if all((pair, name) in weights for name in method.LOOPS):
            hand, ours = weights.pop((pair, "hand")), weights.pop((pair, "distrain"))
            diffs.append(max_abs_diff(hand, ours))
            same.append(diffs[-1] == 0.0)
    return records, same, diffs


def main() -> None:
    if sys.argv[1:2] == ["_hand"]:
        steps, batch, log_every, out, case = sys.argv[2:7]
        return hand_loop(int(steps), int(batch), int(log_every), out, ddp=case == "ddp")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=["single", "ddp"])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--short", type=int, default=100)
    p.add_argument("--long", type=int, default=2100)
    p.add_argument("--log-every", type=int, default=10, help="distrain's train.log_every; the hand loop's loss.item()")
    p.add_argument("--batch", type=int, default=16, help=f"global batch in rows of 64 tokens; divides {N_TRAIN}")
    p.add_argument("--roomy-malloc", action="store_true", help="children run with glibc malloc keeping freed memory "
                   "(see bench/whole_process.py): report with and without")
    p.add_argument("--json", type=Path, help="write every run's wall time and the summary to this file")
    args = p.parse_args()
    if not 0 < args.short < args.long or args.pairs < 1 or args.log_every < 1:
        p.error("need 0 < --short < --long, --pairs >= 1 and --log-every >= 1")
    if args.batch < 2 or N_TRAIN % args.batch or (args.case == "ddp" and args.batch % 2):
        p.error(f"--batch must divide the {N_TRAIN} training rows (and be even for ddp): every batch full and even")
    if shutil.which("taskset") is None:
        p.error("needs taskset (util-linux) to pin the runs to cores")
    available = sorted(os.sched_getaffinity(0))
    cpus = set(available[:1] if args.case == "single" else available[:2])
    env = {**method.ENV, **method.ROOMY_MALLOC} if args.roomy_malloc else method.ENV
    print(f"{args.case} / Llama {LLAMA['num_hidden_layers']}x{LLAMA['hidden_size']}: batch {args.batch} x 64 tokens, "
          f"{args.short} and {args.long} steps, loss read every {args.log_every} steps, {args.pairs} pairs, "
          f"pinned to CPU {sorted(cpus)}{', roomy malloc' if args.roomy_malloc else ''}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        records, same, diffs = measure(args, cpus, env, Path(d))
    summary = method.summarise(records, args.short, args.long)
    method.report(summary, same)
    print(f"largest absolute weight difference per pair: {', '.join(f'{x:.3g}' for x in diffs)}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({**settings, "cpus": sorted(cpus), "date": time.strftime("%Y-%m-%d %H:%M"),
                                         "model": LLAMA, "runs": records, "same_weights": same,
                                         "max_abs_diff": diffs, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
