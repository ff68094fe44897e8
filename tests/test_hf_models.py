"""Hugging Face models (GPT-2, Llama, a BERT classifier) and a torchvision model train under
single, ddp, fsdp and ZeRO-3; tied weights stay tied in every export; a Hugging Face model
resumes bit-exactly after SIGKILL and on another world size; bad inputs exit 2 with one line."""
from __future__ import annotations

import pytest
import torch
import yaml

from conftest import extended, final_weights, max_abs_diff, metrics, run_train
from tests.hf_tiny import BERT, GPT2, LLAMA

STRATEGIES = {"single": (0, ["strategy.name=single"]), "ddp": (2, ["strategy.name=ddp"]),
              "fsdp": (2, ["strategy.name=fsdp"]), "zero3": (2, ["strategy.name=deepspeed", "strategy.zero_stage=3"])}
MASKED = {"name": "tests.hf_tiny:masked_tokens", "n_train": 32, "n_eval": 16}
WORKLOADS = {
    "gpt2": ({"name": "hf", "config": GPT2}, MASKED),
    "llama": ({"name": "hf", "config": LLAMA}, MASKED),
    "bert": ({"name": "hf", "config": BERT},
             {"name": "examples.userpkg.data:variable_length_classes", "n_train": 32, "n_eval": 16, "max_len": 12}),
    "torchvision": ({"name": "examples.userpkg.vision:torchvision_model", "arch": "resnet18"}, {"name": "digits"}),
}


def config_file(tmp_path, workload: str, **train) -> str:
    model, data = WORKLOADS[workload]
    cfg = {"run": {"seed": 0}, "model": model, "data": {**data, "global_batch_size": 8, "eval_batch_size": 16},
           "optim": {"name": "sgd", "lr": 0.1}, "sched": {"name": "constant"},
           "train": {"max_steps": 3, "log_every": 1, **train}, "log": {"progress": "off"}}
    path = tmp_path / f"{workload}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory):
    cache = {}

    def get(workload):
        if workload not in cache:
            tmp = tmp_path_factory.mktemp(f"single-{workload}")
            run_train(["--config", config_file(tmp, workload), f"run.dir={tmp / 'run'}", "strategy.name=single"])
            cache[workload] = tmp / "run"
        return cache[workload]
    return get


CASES = [(w, s) for w in ("gpt2", "bert", "torchvision") for s in ("ddp", "fsdp", "zero3")] + [("llama", "single")]


@pytest.mark.parametrize("workload, strategy", extended(CASES, {
    ("bert", "zero3"), ("torchvision", "fsdp"), ("torchvision", "zero3")}),
                         ids=[f"{w}-{s}" for w, s in CASES])
def test_trains_under_the_strategy_like_one_process(workload, strategy, single_runs, tmp_path):
    reference = single_runs(workload)
    nproc, args = STRATEGIES[strategy]
    run = tmp_path / "run"
    if strategy == "single":
        run = reference
    else:
        run_train(["--config", config_file(tmp_path, workload), f"run.dir={run}", *args], nproc=nproc)
    losses = [r["loss"] for r in metrics(run, "train")]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    evaluation = metrics(run, "eval")[-1]
    assert evaluation["samples"] == (16 if workload != "torchvision" else 360)
    assert ("perplexity" in evaluation) == (workload in ("gpt2", "llama"))
    assert ("accuracy" in evaluation)
    weights = final_weights(run)
    if workload == "torchvision":  # batch norm: per-rank statistics, not the global batch's
        return
    assert max_abs_diff(weights, final_weights(reference)) < 1e-4
    if workload == "gpt2":  # the output head is the token embedding, in every export
        assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])


def test_a_tied_model_loads_back_with_the_logits_the_run_evaluated(single_runs):
    from distrain.data.batch import call_model, collate
    from distrain.models.hf import hf
    from distrain.objectives import TaskLoss
    from tests.hf_tiny import masked_tokens

    run = single_runs("gpt2")
    model = hf(config=GPT2, task="lm").eval()
    model.load_state_dict(final_weights(run))
    assert model.lm_head.weight is model.transformer.wte.weight
    _, evaluation, _ = masked_tokens(n_train=32, n_eval=16)
    batch = collate([evaluation[i] for i in range(len(evaluation))])
    with torch.no_grad():
        loss_sum, count = TaskLoss("lm", "GPT2LMHeadModel").loss(call_model(model, batch), batch)
    assert (loss_sum / count).item() == pytest.approx(metrics(run, "eval")[-1]["loss"], abs=1e-5)


def resume_args(tmp_path, run, strategy, steps, **kill):
    cfg = {"run": {"seed": 0}, "model": {"name": "tests.hf_tiny:killable_hf", "config": LLAMA, **kill},
           "data": {**MASKED, "global_batch_size": 8, "micro_batch_size": 2, "eval_batch_size": 16},
           "optim": {"name": "adamw", "lr": 0.01}, "train": {"max_steps": steps, "log_every": 1},
           "checkpoint": {"every_steps": 2}, "log": {"progress": "off"}}
    path = tmp_path / f"resume-{strategy}-{steps}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["--config", path, f"run.dir={run}", f"strategy.name={strategy}"]


@pytest.mark.parametrize("strategy", extended(["ddp", "fsdp"], {"fsdp"}))
def test_sigkill_then_the_same_command_is_bitwise_exact(strategy, tmp_path):
    reference = tmp_path / "reference"
    run_train(resume_args(tmp_path, reference, strategy, 6), nproc=2)
    run = tmp_path / "run"
    args = resume_args(tmp_path, run, strategy, 6, kill_at=4 * 2 + 1, marker=str(tmp_path / "killed"))
    assert run_train(args, nproc=2, check=False).returncode != 0, "the kill did not happen"
    second = run_train(args, nproc=2)
    assert "resumed from" in second.stdout + second.stderr
    ours, ref = final_weights(run), final_weights(reference)
    assert all(ours[k].equal(ref[k]) for k in ref)
    if strategy == "fsdp":  # and the 2-rank checkpoint resumes on one process
        moved = tmp_path / "moved"
        run_train(resume_args(tmp_path, moved, strategy, 4), nproc=2)
        resumed = run_train(resume_args(tmp_path, moved, strategy, 6), nproc=1)
        assert "resumed from" in resumed.stdout + resumed.stderr
        assert max_abs_diff(final_weights(moved), ref) < 1e-5


def one_line_exit_2(tmp_path, *overrides, workload="llama", keep=False):
    """keep: the run dir holds a finished run, which must stay as it was."""
    proc = run_train(["--config", config_file(tmp_path, workload), f"run.dir={tmp_path / 'run'}", *overrides],
                     check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert keep or not (tmp_path / "run" / "checkpoints").exists()
    return lines[0]


@pytest.mark.parametrize("overrides, expected", [
    (["data.name=tests.hf_tiny:extra_key_tokens"], "batch key 'pixel_values' is not an argument of LlamaForCausalLM"),
    (["model.name=tests.hf_tiny:hidden_states_only"], "HiddenOnly returned a dict with keys hidden with no 'logits'"),
    (["train.loss=model", "data.name=tests.hf_tiny:unlabelled_tokens"], "train.loss=model but LlamaForCausalLM "
                                                                        "returned a CausalLMOutputWithPast"),
    (["data.name=tests.hf_tiny:bad_collate"], "collate gave a str"),
    (["data.name=tests.hf_tiny:ragged_tokens"], "the first training samples do not make a batch (stack expects"),
    (["model.config.model_type=nonesuch"], "model.config.model_type"),
])
def test_bad_inputs_exit_2_with_one_line(overrides, expected, tmp_path):
    assert expected in one_line_exit_2(tmp_path, *overrides)


@pytest.mark.parametrize("strategy", extended(["fsdp", "zero3"], {"zero3"}))
def test_bf16_with_activation_checkpointing_trains_close_to_fp32(strategy, single_runs, tmp_path):
    nproc, args = STRATEGIES[strategy]
    run = tmp_path / "run"
    run_train(["--config", config_file(tmp_path, "llama"), f"run.dir={run}", "train.precision=bf16",
               "train.activation_checkpointing=true", *args], nproc=nproc)
    ours, ref = metrics(run, "eval")[-1], metrics(single_runs("llama"), "eval")[-1]
    assert ours["loss"] == pytest.approx(ref["loss"], abs=0.05) and ours["perplexity"] > 1
    assert all(w.dtype == torch.float32 for w in final_weights(run).values())


def test_a_bad_batch_on_resume_leaves_the_saved_run_as_it_was(single_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(single_runs("llama"), run)

    def saved():  # all but the logs and the run-dir lock, which every start writes
        return {p: p.read_bytes() for p in run.rglob("*")
                if p.is_file() and "logs" not in p.parts and p.name != ".lock"}

    before = saved()
    line = one_line_exit_2(tmp_path, "data.name=tests.hf_tiny:extra_key_tokens", keep=True)
    assert "batch key 'pixel_values'" in line
    assert saved() == before and (run / "config.yaml") in before
