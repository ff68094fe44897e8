"""Token-level losses are exact across ranks and micro-batches: a Llama-style model on dict
batches whose -100 masks leave rank 0 with ~6x the counted tokens of rank 1 ends where the
single-process run without accumulation ends, for every loss source and strategy; the naive
per-micro-batch mean does not."""
from __future__ import annotations

import pytest
import yaml

from conftest import final_weights, max_abs_diff, metrics, run_train
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


STRATEGIES = {"ddp": ["strategy.name=ddp"], "fsdp": ["strategy.name=fsdp"],
              "zero2": ["strategy.name=deepspeed", "strategy.zero_stage=2"],
              "zero3": ["strategy.name=deepspeed", "strategy.zero_stage=3"]}
FN = "examples.userpkg.losses:token_cross_entropy"
# every strategy with the task's loss; the model's loss (counted before the forward, like the task's)
# and a user function (counted after it: gradients rescaled, by the strategy's own path) on two each
CASES = [("ddp", "task"), ("fsdp", "task"), ("zero2", "task"), ("zero3", "task"),
         ("fsdp", "model"), ("zero3", "model"), ("ddp", FN), ("zero2", FN)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the whole global batch in one forward: the plain mean over its tokens."""
    tmp = tmp_path_factory.mktemp("reference")
    run_train(["--config", config_file(tmp), f"run.dir={tmp / 'run'}", "strategy.name=single"])
    return tmp / "run"


@pytest.mark.parametrize("strategy, loss", CASES, ids=[f"{s}-{loss.split(':')[-1]}" for s, loss in CASES])
def test_two_ranks_with_accumulation_match_one_process(strategy, loss, reference, tmp_path):
    run = tmp_path / "run"
    run_train(["--config", config_file(tmp_path, loss, micro=2), f"run.dir={run}", *STRATEGIES[strategy]], nproc=2)
    assert max_abs_diff(final_weights(run), final_weights(reference)) < 1e-5
    ours, ref = metrics(run, "train"), metrics(reference, "train")
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in ref], abs=1e-5)
    assert metrics(run, "eval")[-1]["loss"] == pytest.approx(metrics(reference, "eval")[-1]["loss"], abs=1e-5)


def test_the_naive_per_micro_batch_mean_ends_elsewhere(reference, tmp_path):
    run = tmp_path / "run"
    run_train(["--config", config_file(tmp_path, "tests.hf_tiny:naive_mean", micro=2), f"run.dir={run}",
               "strategy.name=ddp"], nproc=2)
    assert max_abs_diff(final_weights(run), final_weights(reference)) > 1e-3
