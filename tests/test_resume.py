"""Exact resume after SIGKILL, for every checkpoint format, wherever the kill lands; and after a
preemption signal, which checkpoints and exits with code 3."""
import pytest

from conftest import CONFIGS, EXTENDED, final_weights, run_train

STEPS, EVERY, EVAL_EVERY = 30, 8, 10  # 1437 samples / 64 = 23 steps per epoch: the run crosses an epoch


def args_for(run, strategy, **kill):
    extra = [f"model.{k}={v}" for k, v in kill.items()]
    return ["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={run}", "model.name=tests.faults:killable_mlp",
            "model.hidden=[32,32]", "train.epochs=null", f"train.max_steps={STEPS}", f"train.eval_every={EVAL_EVERY}",
            f"checkpoint.every_steps={EVERY}", "train.log_every=5", "data.global_batch_size=64",
            "data.micro_batch_size=16", "data.eval_batch_size=128", "optim.lr=0.01", *strategy, *extra]


STRATEGIES = {
    "single": (0, ["strategy.name=single"]),
    "ddp": (2, ["strategy.name=ddp"]),
    "fsdp": (2, ["strategy.name=fsdp"]),
    "zero2": (2, ["strategy.name=deepspeed", "strategy.zero_stage=2"]),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            nproc, strategy = STRATEGIES[name]
            run = tmp_path_factory.mktemp(f"ref-{name}") / "run"
            run_train(args_for(run, strategy), nproc=nproc)
            cache[name] = final_weights(run)
        return cache[name]
    return get


def accumulation(name):
    return 4 if STRATEGIES[name][0] == 0 else 2


# where the kill lands, as (training forward index | eval forward index | checkpoint write); every
# strategy is killed mid-accumulation, at an accumulation boundary, right after a checkpoint
# (the first forward after step 8 or 16) and during evaluation, all mid-epoch
CASES = [
    ("single", "mid-accumulation", lambda a: {"kill_at": 13 * a + 2}),
    ("single", "accumulation-boundary", lambda a: {"kill_at": 13 * a}),
    ("single", "right-after-checkpoint", lambda a: {"kill_at": 16 * a}),
    ("single", "during-eval", lambda a: {"kill_eval_at": 4}),  # 3 eval batches per eval: the 2nd eval
    ("ddp", "accumulation-boundary", lambda a: {"kill_at": 13 * a}),
    ("ddp", "mid-accumulation", lambda a: {"kill_at": 13 * a + 1}),
    ("ddp", "right-after-checkpoint", lambda a: {"kill_at": 16 * a}),
    ("ddp", "during-eval", lambda a: {"kill_eval_at": 2}),  # 2 eval forwards per rank per eval
    ("fsdp", "mid-accumulation", lambda a: {"kill_at": 13 * a + 1}),
    ("fsdp", "accumulation-boundary", lambda a: {"kill_at": 13 * a}),
    ("fsdp", "right-after-checkpoint", lambda a: {"kill_at": 8 * a}),
    ("fsdp", "during-eval", lambda a: {"kill_eval_at": 2}),
    ("zero2", "mid-accumulation", lambda a: {"kill_at": 13 * a + 1}),
    ("zero2", "accumulation-boundary", lambda a: {"kill_at": 19 * a}),
    ("zero2", "right-after-checkpoint", lambda a: {"kill_at": 16 * a}),
    ("zero2", "during-eval", lambda a: {"kill_eval_at": 2}),
]


EXTENDED_KILLS = {("ddp", "accumulation-boundary"), ("zero2", "accumulation-boundary"), ("zero2", "during-eval"),
                  ("ddp", "right-after-checkpoint"), ("zero2", "right-after-checkpoint")}


@pytest.mark.parametrize("name, where, kill", [pytest.param(*c, marks=[EXTENDED] if c[:2] in EXTENDED_KILLS else [])
                                               for c in CASES], ids=[f"{n}-{w}" for n, w, _ in CASES])
def test_sigkill_then_same_command_is_bitwise_exact(name, where, kill, references, tmp_path):
    nproc, strategy = STRATEGIES[name]
    run = tmp_path / "run"
    args = args_for(run, strategy, marker=tmp_path / "killed", **kill(accumulation(name)))
    real = name == "ddp"  # torchrun's own teardown of the survivor
    first = run_train(args, nproc=nproc, check=False, torchrun=real)
    assert first.returncode != 0, "the kill did not happen"
    assert list(tmp_path.glob("killed.rank*")), "no rank reached the kill point"
    second = run_train(args, nproc=nproc, torchrun=real)
    assert "resumed from" in second.stdout + second.stderr
    ours, ref = final_weights(run), references(name)
    assert all(ours[k].equal(ref[k]) for k in ref), f"{name}/{where}: weights differ from the uninterrupted run"


@pytest.mark.parametrize("name, signal_name, rank", [("single", "SIGTERM", -1), ("ddp", "SIGUSR1", 1)])
def test_a_preemption_signal_checkpoints_exits_3_and_resumes_exactly(name, signal_name, rank, references, tmp_path):
    nproc, strategy = STRATEGIES[name]
    run = tmp_path / "run"
    # mid-accumulation in step 14; under ddp only rank 1 is signalled and both must stop at the same step
    args = args_for(run, strategy, marker=tmp_path / "signalled", kill_at=13 * accumulation(name) + 1,
                    kill_signal=signal_name, kill_rank=rank)
    first = run_train(args, nproc=nproc, check=False, torchrun=True)
    if nproc == 0:
        assert first.returncode == 3, first.stderr[-2000:]
    else:  # torchrun reports its workers' non-zero exit as its own failure
        assert first.returncode != 0
    # the signalled step's end, or under ddp the next one (the ranks learn of another's flag at a barrier)
    step = int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))
    assert step == 14 if nproc == 0 else step in (14, 15)
    for r in range(max(nproc, 1)):
        assert f"preemption signal: checkpointing at step {step}" in (run / "logs" / f"rank{r}.log").read_text()
    second = run_train(args, nproc=nproc)
    assert "resumed from" in second.stdout + second.stderr
    ours, ref = final_weights(run), references(name)
    assert all(ours[k].equal(ref[k]) for k in ref), f"{name}: weights differ from the uninterrupted run"


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(references, tmp_path):
    run = tmp_path / "run"
    # rank 0 dies inside the checkpoint at step 16, after its temp dir was started
    args = args_for(run, STRATEGIES["ddp"][1], marker=tmp_path / "killed", kill_on_save_after=16 * 2)
    assert run_train(args, nproc=2, check=False).returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000008"
    assert (ckpts / ".tmp-step_00000016").is_dir() and not (ckpts / "step_00000016").exists()
    second = run_train(args, nproc=2)
    assert "resumed from" in second.stdout and "step_00000008" in second.stdout
    ours, ref = final_weights(run), references("ddp")
    assert all(ours[k].equal(ref[k]) for k in ref)
    assert not (ckpts / ".tmp-step_00000016").exists()
