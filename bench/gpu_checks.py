"""The GPU's functional checks (bench/gpu.py's `strategies` and `resume` parts): every strategy
against `single` on cuda:0 with nccl, and SIGKILL-then-resume bit for bit."""
from __future__ import annotations

from pathlib import Path

from bench.gpu_common import CONFIG, device_of, launch, max_diff, pool, rows, weights

STRATEGY_BASE = ["--config", CONFIG, "train.epochs=null", "train.max_steps=25", "train.log_every=5",
                 "checkpoint.every_steps=0", "optim.name=adamw", "optim.lr=0.01", "sched.warmup_steps=5",
                 "data.global_batch_size=64", "train.grad_clip=1.0", "model.hidden=[32,32]"]
STRATEGIES = {
    "ddp": ["strategy.name=ddp"], "fsdp": ["strategy.name=fsdp"], "dp": ["strategy.name=dp"],
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
    "zero2-offload": ["strategy.name=deepspeed", "strategy.zero_stage=2", "strategy.offload=optimizer"],
    "zero3-offload": ["strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.offload=optimizer+params"],
    "ddp-accumulation": ["strategy.name=ddp", "data.micro_batch_size=8"],
}
TRAINS = {  # these change the arithmetic: they must train, not match fp32 single
    "single-fp16": ["strategy.name=single", "train.precision=fp16"],
    "single-bf16-compile": ["strategy.name=single", "train.precision=bf16", "train.compile=true"],
    "ddp-bf16": ["strategy.name=ddp", "train.precision=bf16"],
    "ddp-compile": ["strategy.name=ddp", "train.compile=true"],
    "fsdp-bf16": ["strategy.name=fsdp", "train.precision=bf16"],
    "zero2-bf16": ["strategy.name=deepspeed", "strategy.zero_stage=2", "train.precision=bf16"],
    "zero3-fp16": ["strategy.name=deepspeed", "strategy.zero_stage=3", "train.precision=fp16"],
}


def part_strategies(out: Path, small: bool) -> list[dict]:
    def run(name, extra, nproc):
        d = out / "strategies" / name
        d.mkdir(parents=True, exist_ok=True)
        code = launch([*STRATEGY_BASE, f"run.dir={d / 'run'}", *extra], nproc, d / "log.txt")
        return code, d

    ref_code, ref_dir = run("single", ["strategy.name=single"], 0)
    ref = weights(ref_dir / "run")
    jobs = {n: (lambda n=n, e=e: run(n, e, 1)) for n, e in {**STRATEGIES, **TRAINS}.items()}
    done = pool(jobs, 8)
    results = [{"case": "single", "exit": ref_code, "device": device_of(ref_dir / "log.txt"), "ok": ref_code == 0}]
    for name, (code, d) in done.items():
        train, ev = rows(d / "run"), rows(d / "run", "eval")
        r = {"case": name, "exit": code, "device": device_of(d / "log.txt"),
             "eval_accuracy": ev[-1].get("accuracy") if ev else None}
        if name in STRATEGIES:
            r["max_diff_to_single"] = max_diff(weights(d / "run"), ref)
            r["ok"] = code == 0 and r["max_diff_to_single"] <= 1e-5
        else:
            w = weights(d / "run")
            finite = w is not None and all(bool(v.float().isfinite().all()) for v in w.values())
            r["loss_first_last"] = [train[0]["loss"], train[-1]["loss"]] if train else None
            r["ok"] = code == 0 and finite and bool(train) and train[-1]["loss"] < train[0]["loss"]
        results.append(r)
    return results


RESUME_CASES = {  # name: (nproc, strategy args, kill at this training forward: mid-epoch, mid-accumulation)
    "single": (0, ["strategy.name=single"], 13 * 4 + 2),
    "ddp": (1, ["strategy.name=ddp"], 13 * 4 + 1),
    "fsdp": (1, ["strategy.name=fsdp"], 13 * 4 + 1),
    "zero2": (1, ["strategy.name=deepspeed", "strategy.zero_stage=2"], 19 * 4),
}


def resume_args(run: Path, strategy: list, **model) -> list:
    return ["--config", CONFIG, f"run.dir={run}", "model.name=tests.faults:killable_mlp", "model.hidden=[32,32]",
            "train.epochs=null", "train.max_steps=30", "train.eval_every=10", "checkpoint.every_steps=8",
            "train.log_every=5", "data.global_batch_size=64", "data.micro_batch_size=16", "data.eval_batch_size=128",
            "optim.lr=0.01", *strategy, *[f"model.{k}={v}" for k, v in model.items()]]


def part_resume(out: Path, small: bool) -> list[dict]:
    def case(name):
        nproc, strategy, kill_at = RESUME_CASES[name]
        d = out / "resume" / name
        d.mkdir(parents=True, exist_ok=True)
        ref = launch(resume_args(d / "ref", strategy), nproc, d / "ref.txt")
        args = resume_args(d / "run", strategy, kill_at=kill_at, marker=d / "killed")
        first = launch(args, nproc, d / "run.txt")
        second = launch(args, nproc, d / "run.txt")
        from bench.common import same_weights

        a, b = weights(d / "ref"), weights(d / "run")
        same = a is not None and b is not None and same_weights(a, b)
        killed = first != 0 and bool(list(d.glob("killed.rank*")))
        resumed = "resumed from" in (d / "run.txt").read_text()
        return {"case": name, "device": device_of(d / "ref.txt"), "killed": killed, "resumed": resumed,
                "exit": [ref, first, second], "bitwise_equal": same, "ok": ref == 0 and second == 0 and killed and resumed and same}

    return list(pool({n: (lambda n=n: case(n)) for n in RESUME_CASES}, 4).values())
