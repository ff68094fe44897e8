"""Token-level losses are exact across ranks and micro-batches: a Llama-style model on dict
batches whose -100 masks leave rank 0 with ~6x the counted tokens of rank 1 ends where the
single-process run without accumulation ends, for every loss source and strategy; the naive
per-micro-batch mean does not."""
from __future__ import annotations

import pytest
import yaml

from conftest import extended, final_weights, max_abs_diff, metrics, run_train, train_inprocess
from tests.hf_tiny import LLAMA

GLOBAL = 8


def config_file(tmp_path, loss: str = "task", micro: int | None = None):
    cfg = {"run": {"seed": 0}, "model": {"name": "hf", "config": LLAMA},
           "data": {"name": "tests.hf_tiny:masked_tokens", "skew_batch": GLOBAL, "global_batch_size": GLOBAL,
                    "micro_batch_size": micro, "eval_batch_size": 8},
           "optim": {"name": "sgd", "lr": 0.5}, "sched": {"name": "constant"},
           "train": {"max_steps": 3, "log_every": 1, "loss": loss}, "log": {"progress": "off"}}
    path = tmp_path / f"exact-{loss.replace(':', '-')}-{micro}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# (launch arguments, processes): one-process strategies accumulate 4 micro-batches of 2 instead
STRATEGIES = {"single": (["strategy.name=single"], 0), "dp": (["strategy.name=dp"], 0),
              "ddp": (["strategy.name=ddp"], 2),  # the shared-memory average on one machine's CPUs
              "ddp_plain": (["strategy.name=ddp", "strategy.shared_memory=false"], 2),  # DDP's own gloo all-reduce
              "fsdp": (["strategy.name=fsdp"], 2),
              **{f"zero{n}": (["strategy.name=deepspeed", f"strategy.zero_stage={n}"], 2) for n in range(4)}}
FN = "examples.userpkg.losses:token_cross_entropy"
# the model's loss and a user function on every strategy. The model's loss is counted before the
# forward like the task's: its runs check each strategy's path for both, the task's own run is the
# default one. The user function's count comes after its forward: the gradients are rescaled by each
# strategy's own path (ZeRO-0: in distrain's step; ZeRO 1-3: in their partitions)
CASES = [("ddp", "task")] + [(s, loss) for loss in ("model", FN) for s in STRATEGIES]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the whole global batch in one forward: the plain mean over its tokens."""
    tmp = tmp_path_factory.mktemp("reference")
    assert train_inprocess(["--config", config_file(tmp), f"run.dir={tmp / 'run'}", "strategy.name=single"]) == 0
    return tmp / "run"


# by default every strategy but ZeRO-1 (ZeRO-2's optimizer, gradients not partitioned) with one
# source at least, the replicated ones and fsdp with every source
EXTENDED_CASES = {("zero1", "model"), ("zero1", FN), ("zero2", "model"), ("zero3", FN)}


@pytest.mark.parametrize("strategy, loss", extended(CASES, EXTENDED_CASES),
                         ids=[f"{s}-{loss.split(':')[-1]}" for s, loss in CASES])
def test_ranks_and_accumulation_match_one_process(strategy, loss, reference, tmp_path):
    run, (args, nproc) = tmp_path / "run", STRATEGIES[strategy]
    args = ["--config", config_file(tmp_path, loss, micro=2), f"run.dir={run}", *args]
    if nproc:
        run_train(args, nproc=nproc)
    else:  # in this process: after the first such run, without the imports' seconds
        assert train_inprocess(args) == 0
    assert max_abs_diff(final_weights(run), final_weights(reference)) < 1e-5
    ours, ref = metrics(run, "train"), metrics(reference, "train")
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in ref], abs=1e-5)
    assert metrics(run, "eval")[-1]["loss"] == pytest.approx(metrics(reference, "eval")[-1]["loss"], abs=1e-5)
    if strategy.startswith("ddp"):  # each ddp case ran the averaging it names
        shared = "through shared memory" in (run / "logs" / "rank0.log").read_text()
        assert shared == (strategy == "ddp")


def test_the_naive_per_micro_batch_mean_ends_elsewhere(reference, tmp_path):
    run = tmp_path / "run"
    run_train(["--config", config_file(tmp_path, "tests.hf_tiny:naive_mean", micro=2), f"run.dir={run}",
               "strategy.name=ddp"], nproc=2)
    assert max_abs_diff(final_weights(run), final_weights(reference)) > 1e-3


@pytest.mark.parametrize("strategy", ["single", "dp", "ddp", "deepspeed"])
def test_fsdp_blocks_under_another_strategy_exits_2_before_anything_is_written(strategy, tmp_path, capsys):
    run = tmp_path / "run"
    code = train_inprocess(["--config", config_file(tmp_path), f"run.dir={run}", f"strategy.name={strategy}",
                            "strategy.fsdp_blocks=[LlamaDecoderLayer]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not run.exists()
    assert "'strategy.fsdp_blocks'" in err[0] and f"strategy.name=fsdp ({strategy} would ignore it)" in err[0]
