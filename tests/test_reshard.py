"""A run saved on 2 ranks resumes on 1 and on 4, and outside tools read our sharded checkpoints."""
import pytest
import torch

from conftest import CONFIGS, extended, final_weights, max_abs_diff, run_train

N_TRAIN, GLOBAL = 384, 32  # 12 steps per epoch; every world size divides the batch: no stand-ins


def args_for(run, strategy, steps, record=None):
    return ["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={run}", "model.name=tests.faults:killable_mlp",
            "model.hidden=[32,32]", "data.name=tests.faults:indexed_digits", f"data.n_train={N_TRAIN}",
            f"data.global_batch_size={GLOBAL}", "train.epochs=null", f"train.max_steps={steps}", "sched.name=constant",
            "sched.warmup_steps=0", "optim.lr=0.01", "checkpoint.every_steps=0", "train.log_every=4",
            *([f"model.record={record}"] if record else []), *strategy]


STRATEGIES = {
    "ddp": ["strategy.name=ddp"],
    "fsdp": ["strategy.name=fsdp"],
    "zero0": ["strategy.name=deepspeed", "strategy.zero_stage=0"],  # the weights are their own fp32 master
    "zero1": ["strategy.name=deepspeed", "strategy.zero_stage=1"],
    "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
    "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"],
}
CASES = [("ddp", 1), ("ddp", 4), ("fsdp", 1), ("fsdp", 4), ("zero0", 1), ("zero1", 4), ("zero2", 1), ("zero3", 1),
         ("zero3", 4)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            run = tmp_path_factory.mktemp(f"ref-{name}") / "run"
            run_train(args_for(run, STRATEGIES[name], steps=12), nproc=2)
            cache[name] = final_weights(run)
        return cache[name]
    return get


@pytest.mark.parametrize("name, new_world", extended(CASES, {("ddp", 4), ("zero1", 4), ("zero2", 1), ("zero3", 4)}),
                         ids=[f"{n}-2to{w}" for n, w in CASES])
def test_resume_on_another_world_size(name, new_world, uninterrupted, tmp_path):
    run, record = tmp_path / "run", tmp_path / "ids"
    run_train(args_for(run, STRATEGIES[name], steps=5, record=record), nproc=2)  # stops 5 steps into the epoch
    resumed = run_train(args_for(run, STRATEGIES[name], steps=12, record=record), nproc=new_world)
    assert "resumed from" in resumed.stdout and "at step 5 (epoch 0, 160 samples into it)" in resumed.stdout
    seen = [int(i) for f in tmp_path.glob("ids.rank*") for line in f.read_text().split("\n") for i in line.split()]
    assert sorted(seen) == list(range(N_TRAIN)), "each sample of the interrupted epoch exactly once"
    assert len(list(tmp_path.glob("ids.rank*"))) == max(2, new_world)
    # model and optimizer state came across: the result is the 2-rank run's, up to summation order
    assert max_abs_diff(final_weights(run), uninterrupted(name)) <= 1e-5


def test_torch_dcp_reader_reads_our_sharded_checkpoint(tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = tmp_path / "run"
    run_train(args_for(run, STRATEGIES["fsdp"], steps=6), nproc=2)
    dcp_to_torch_save(run / "checkpoints" / "step_00000006" / "dcp", tmp_path / "plain.pt")
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)["model"]
    final = final_weights(run)
    assert plain.keys() == final.keys() and all(plain[k].equal(final[k]) for k in final)
    assert_export_matches(run, final, tmp_path)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_to_fp32_reads_our_zero_checkpoint(stage, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = tmp_path / "run"
    run_train(args_for(run, STRATEGIES[f"zero{stage}"], steps=6), nproc=2)
    state = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints" / "step_00000006" / "deepspeed"), tag="state")
    final = final_weights(run)
    assert state.keys() == final.keys() and all(state[k].equal(final[k]) for k in final)
    assert_export_matches(run, final, tmp_path)


def assert_export_matches(run, final, tmp_path):
    from distrain.cli import main

    assert main(["export", str(run / "checkpoints" / "step_00000006"), str(tmp_path / "export.pt")]) == 0
    exported = torch.load(tmp_path / "export.pt", weights_only=True)
    assert exported.keys() == final.keys() and all(exported[k].equal(final[k]) for k in final)
