"""GPU checks and benchmarks, for a machine with one CUDA GPU, in one run.

    python bench/gpu.py [--parts strategies resume memory overhead mfu profile] [--out DIR] [--report DIR] [--small]
                        [--mfu-cases single ddp] [--mfu-micro 32 64 ...] [--budget-s S]

strategies  every strategy under torchrun on cuda:0 with nccl (world size 1) against `single`
            (25 AdamW steps, clipping on): final weights within 1e-5; fp16 (GradScaler), bf16 and
            torch.compile runs train (loss down, finite weights)
resume      SIGKILL mid-epoch, then the same command: final weights bit for bit those of the
            uninterrupted run (single, ddp, fsdp, ZeRO-2)
memory      peak CUDA memory of a fp32 GPT (~250M parameters, batch 1) under ddp and ZeRO-2/3
            against the 16 bytes/parameter of weights, gradients and Adam's two moments
overhead    ResNet-18 on CIFAR-shaped data that lives on the GPU: distrain against a hand-written
            loop in one process, interleaved rounds, images/s ratio (target >= 0.99)
mfu         GPT-2 small shape (124M, seq 1024), bf16, torch.compile, single and ddp: tokens/s and
            MFU against the card's dense bf16 peak, and a profile of three steps

The functional checks run several trainings at once (each is far too small to fill the GPU);
the timed parts run alone. --small shrinks every size so that the script itself can be tried
on a CPU. Results: a table on stdout, details as JSON and logs under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.gpu_checks import part_resume, part_strategies  # noqa: E402
from bench.gpu_common import DEADLINE, ROOT, images, launch, pool, rows  # noqa: E402


TINY_GPT = {"n_layer": 2, "n_head": 2, "d_model": 64, "seq_len": 32, "vocab": 512}  # --small
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "d_model": 768, "seq_len": 1024, "vocab": 50304}  # 124M, for MFU
MEMORY_GPT = {"n_layer": 16, "n_head": 16, "d_model": 1024, "seq_len": 256, "vocab": 50304}  # 253M, short sequences


def gpt_args(s: dict, micro: int, n_train: int) -> list:
    """A GPT of shape `s` on random tokens already on the GPU, `micro` sequences per step."""
    return ["data.name=bench.gpu_common:tokens", f"data.n_train={n_train}", "data.n_eval=2", f"data.seq_len={s['seq_len']}",
            f"data.vocab_size={s['vocab']}", "model.name=gpt", f"model.n_layer={s['n_layer']}",
            f"model.n_head={s['n_head']}", f"model.d_model={s['d_model']}", f"data.global_batch_size={micro}",
            "data.eval_batch_size=2", "train.epochs=null", "checkpoint.every_steps=0", "train.grad_clip=1.0",
            "optim.name=adamw"]


@contextlib.contextmanager
def wrapped_train_step(wrap):
    """distrain's Trainer.train_step replaced by wrap(original), for the runs in this process."""
    from distrain.trainer import Trainer

    original = Trainer.train_step
    Trainer.train_step = wrap(original)
    try:
        yield
    finally:
        Trainer.train_step = original


def part_memory(out: Path, small: bool, precision: str = "bf16") -> list[dict]:
    """One process, nothing partitioned at world size 1: the ZeRO paper's 16 bytes per parameter
    are 16-bit weights and gradients (2 + 2) and fp32 master weights and Adam's moments (4 + 8);
    in fp32, weights 4 + gradients 4 + moments 8. Activations of one short sequence are a few percent."""
    import torch

    from distrain.models.gpt import gpt

    s = TINY_GPT if small else MEMORY_GPT
    with torch.device("meta"):
        params = sum(p.numel() for p in gpt(s["vocab"], s["seq_len"], s["n_layer"], s["n_head"], s["d_model"]).parameters())
    base = [*gpt_args(s, micro=1, n_train=8), "optim.lr=1e-4", "train.max_steps=4", "train.log_every=1",
            f"train.precision={precision}"]
    cases = {"ddp": ["strategy.name=ddp"], "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
             "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"]}

    def case(name):
        d = out / "memory" / name
        d.mkdir(parents=True, exist_ok=True)
        code = launch(["--config", BARE, f"run.dir={d / 'run'}", *base, *cases[name]], 1, d / "log.txt")
        peak = max((r["peak_memory_mb"] for r in rows(d / "run")), default=None)
        model_states = 16 * params / 2**20
        return {"case": name, "precision": precision, "exit": code, "params": params, "model_states_mb": model_states,
                "peak_mb": peak, "peak_over_model_states": peak / model_states if peak else None}

    return list(pool({n: (lambda n=n: case(n)) for n in cases}, 3).values())


def part_overhead(out: Path, small: bool, rounds: int = 5) -> dict:
    """Runs in this process: each round times the hand-written loop, distrain, and the hand-written
    loop with distrain's per-step non-finite check (one host sync), in rotating order."""
    import torch
    import torch.nn.functional as F

    from distrain.models.vision import resnet18
    from distrain.strategies.common import all_finite
    from distrain.train import main

    torch.backends.cudnn.benchmark = True
    batch, warmup, steps = (16, 2, 6) if small else (256, 30, 150)
    train, _, _ = images(n_train=batch * 16, n_eval=batch)
    x_all, y_all = train.tensors
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    device = x_all.device

    def hand(check: bool) -> float:
        torch.manual_seed(0)
        model = resnet18().to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator(device="cpu").manual_seed(0)
        perm, pos = torch.randperm(len(x_all), generator=g).to(device), 0
        for i in range(warmup + steps):
            if i == warmup:
                sync()
                t0 = time.perf_counter()
            if pos + batch > len(x_all):
                perm, pos = torch.randperm(len(x_all), generator=g).to(device), 0
            idx = perm[pos : pos + batch]
            pos += batch
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            loss.backward()
            if not check or all_finite([p.grad for p in model.parameters()]):
                opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        return steps * batch / (time.perf_counter() - t0)

    def distrain_loop() -> float:
        marks = {}

        def timed(step):
            def run(self):
                result = step(self)
                if self.step + 1 in (warmup, warmup + steps):
                    sync()
                    marks[self.step + 1] = time.perf_counter()
                return result
            return run

        with wrapped_train_step(timed), tempfile.TemporaryDirectory() as d:
            code = main(["--config", BARE, f"run.dir={d}/run", "data.name=bench.gpu_common:images",
                         f"data.n_train={batch * 16}", f"data.n_eval={batch}", "model.name=resnet18",
                         "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4",
                         "sched.name=constant", "sched.warmup_steps=0", "train.precision=bf16",
                         f"data.global_batch_size={batch}", f"data.eval_batch_size={batch}", "train.epochs=null",
                         f"train.max_steps={warmup + steps}", f"train.log_every={warmup + steps}",
                         "train.eval_every=0", "checkpoint.every_steps=0", "log.level=warning"])
        assert code == 0, f"distrain exited {code}"
        return steps * batch / (marks[warmup + steps] - marks[warmup])

    loops = {"hand": lambda: hand(False), "distrain": distrain_loop, "hand+check": lambda: hand(True)}
    names, per_round = list(loops), []
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        per_round.append({n: loops[n]() for n in order})
    result = {"batch": batch, "steps": steps, "rounds": per_round}
    for n in names:
        ratios = [pr[n] / pr["hand"] for pr in per_round]
        result[n] = {"images_per_s": statistics.median(pr[n] for pr in per_round),
                     "ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return result


def part_mfu(out: Path, small: bool, cases: tuple = ("single", "ddp"), micros: tuple = (32,)) -> list[dict]:
    results = []
    for micro in micros:
        results += mfu_runs(out, small, cases, 2 if small else micro)
    return results


def mfu_runs(out: Path, small: bool, cases: tuple, micro: int) -> list[dict]:
    s = TINY_GPT if small else GPT2_SMALL
    steps, every = (20, 5) if small else (40, 10)
    base = [*gpt_args(s, micro, n_train=micro * 4), "optim.lr=6e-4", "optim.weight_decay=0.1",
            "optim.betas=[0.9,0.95]", "train.precision=bf16", "train.compile=true",
            f"train.max_steps={steps}", f"train.log_every={every}"]
    results = []
    runs = (("single", ["strategy.name=single"], 0), ("ddp", ["strategy.name=ddp"], 1))
    for name, extra, nproc in (r for r in runs if r[0] in cases):
        d = out / "mfu" / f"{name}-{micro}"
        d.mkdir(parents=True, exist_ok=True)
        code = launch(["--config", BARE, f"run.dir={d / 'run'}", *base, *extra], nproc, d / "log.txt", timeout=400)
        steady = [r for r in rows(d / "run") if r["step"] > every]  # the first window holds the compilation
        results.append({"case": name, "exit": code, "micro_batch": micro, "shape": s,
                        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if steady else None,
                        "mfu": statistics.median(r["mfu"] for r in steady) if steady and "mfu" in steady[0] else None,
                        "step_time_s": statistics.median(r["step_time_s"] for r in steady) if steady else None,
                        "peak_memory_mb": max((r["peak_memory_mb"] for r in steady), default=None)})
    return results


class Profiled(Exception):
    pass


def profile_steps(out: Path, small: bool) -> None:
    """Three compiled GPT steps under the profiler (in this process): where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from distrain.train import main

    s, micro = (TINY_GPT, 2) if small else (GPT2_SMALL, 32)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)

    def traced(step):
        def run(self):
            if self.step == 6:
                prof.start()
            result = step(self)
            if self.step == 8:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                prof.stop()
                raise Profiled  # ends the run (distrain reports it as a failure): its eval and checkpoint are not wanted
            return result
        return run

    with wrapped_train_step(traced), tempfile.TemporaryDirectory() as d:
        main(["--config", BARE, f"run.dir={d}/run", *gpt_args(s, micro, n_train=micro * 4), "train.precision=bf16",
              "train.compile=true", "train.max_steps=10", "train.log_every=10", "log.level=warning"])
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (out / "profile.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=25))


def versions() -> dict:
    import torch

    info = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver, memory"] = smi.stdout.strip()
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        info["deepspeed"] = None
    return info


PARTS = {"strategies": part_strategies, "resume": part_resume, "memory": part_memory, "overhead": part_overhead,
         "mfu": part_mfu}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=[*PARTS, "profile"], default=[*PARTS, "profile"])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu")
    p.add_argument("--report", type=Path, help="where gpu.json and profile.txt go (default: --out)")
    p.add_argument("--small", action="store_true", help="tiny sizes: try the script itself on a CPU")
    p.add_argument("--memory-precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--mfu-cases", nargs="+", choices=["single", "ddp"], default=["single", "ddp"])
    p.add_argument("--mfu-micro", nargs="+", type=int, default=[32], help="micro batch sizes for the MFU runs")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="stop starting runs after this many seconds")
    args = p.parse_args()
    DEADLINE[0] = time.monotonic() + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report_dir = args.report or args.out
    report_dir.mkdir(parents=True, exist_ok=True)
    global BARE
    BARE = str(args.out / "bare.yaml")
    Path(BARE).write_text("run: {name: gpu}\n")
    report = {"versions": versions()}
    print(json.dumps(report["versions"]), flush=True)
    for part in args.parts:
        t0 = time.perf_counter()
        if time.monotonic() > DEADLINE[0]:
            report[part] = "skipped: out of time"
            continue
        try:
            if part == "profile":
                profile_steps(report_dir, args.small)
                report[part] = "profile.txt"
            elif part == "memory":
                report[part] = part_memory(args.out, args.small, args.memory_precision)
            elif part == "mfu":
                report[part] = part_mfu(args.out, args.small, tuple(args.mfu_cases), tuple(args.mfu_micro))
            else:
                report[part] = PARTS[part](args.out, args.small)
        except Exception as e:  # one broken part must not cost the others' results
            report[part] = {"error": f"{type(e).__name__}: {e}"}
        print(f"== {part} ({time.perf_counter() - t0:.0f} s)\n{json.dumps(report[part], indent=1, default=str)}", flush=True)
        (report_dir / "gpu.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
