"""Weights in and out under every strategy, real processes: a tiny Llama saved with
save_pretrained (sharded) starts each run with transformers' own first-step loss; final/
holds model.safetensors and the hf/ layout that from_pretrained loads with the same logits;
`distrain export` of the last checkpoint (full, DCP, DeepSpeed) gives what the run's own
final export gives; bad init files exit 2 with one line."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT, clean_env, extended, final_weights, metrics, run_train
from tests.hf_tiny import LLAMA, masked_tokens, save_causal_lm

GLOBAL = 8
META_LINE = "model built on the meta device"
# an odd MLP width: FSDP2 shards those weights unevenly (rank 0 holds one row more)
MODEL = {**LLAMA, "intermediate_size": 129}
STRATEGIES = {"single": ([], 0), "dp": (["strategy.name=dp"], 0), "ddp": (["strategy.name=ddp"], 2),
              "fsdp": (["strategy.name=fsdp"], 2),
              "zero1": (["strategy.name=deepspeed", "strategy.zero_stage=1"], 2),
              "zero2": (["strategy.name=deepspeed", "strategy.zero_stage=2"], 2),
              "zero3": (["strategy.name=deepspeed", "strategy.zero_stage=3"], 2)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = save_causal_lm(tmp_path_factory.mktemp("pretrained") / "llama", MODEL, seed=123, max_shard_size="100KB")
    assert len(list(path.glob("model-*.safetensors"))) >= 2
    return path


def config_file(tmp_path, init_from, **model):
    cfg = {"run": {"seed": 0}, "model": {"name": "hf", "config": MODEL, "init_from": str(init_from), **model},
           "data": {"name": "tests.hf_tiny:masked_tokens", "global_batch_size": GLOBAL, "eval_batch_size": 8},
           "optim": {"name": "sgd", "lr": 0.5}, "sched": {"name": "constant"},
           "train": {"max_steps": 2, "log_every": 1}, "checkpoint": {"every_steps": 1},
           "log": {"progress": "off"}}
    path = tmp_path / "init.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def first_batch():
    from distrain.data.batch import collate
    from distrain.data.sampler import epoch_permutation

    train, _, _ = masked_tokens()
    return collate([train[int(i)] for i in epoch_permutation(len(train), 0, 0)[:GLOBAL]])


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distrain", "export", *map(str, args)], capture_output=True,
                          text=True, env=clean_env(), cwd=ROOT, timeout=120)


def safetensors_state(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("strategy", extended(list(STRATEGIES), {"zero2"}))  # ZeRO-2 loads as ZeRO-1 does
def test_init_from_a_sharded_hf_dir_then_final_formats_round_trip(strategy, pretrained, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    args, nproc = STRATEGIES[strategy]
    run_train(["--config", config_file(tmp_path, pretrained), f"run.dir={run}", *args], nproc=nproc)

    batch = first_batch()
    reference = AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True)
    with torch.no_grad():
        expected = reference(**batch).loss.item()
    assert metrics(run, "train")[0]["loss"] == pytest.approx(expected, abs=1e-6)
    # fsdp and ZeRO-3 build the model on the meta device; each rank reads what it holds
    assert (META_LINE in (run / "logs" / "rank0.log").read_text()) == (strategy in ("fsdp", "zero3"))

    final = final_weights(run)
    in_safetensors = safetensors_state(run / "final" / "model.safetensors")
    assert in_safetensors.keys() == final.keys() and all(torch.equal(in_safetensors[k], final[k]) for k in final)
    ours = AutoModelForCausalLM.from_config(reference.config)
    ours.load_state_dict(final)
    exported = AutoModelForCausalLM.from_pretrained(run / "final" / "hf", local_files_only=True)
    assert not torch.equal(final["lm_head.weight"], reference.lm_head.weight)  # it trained
    assert torch.equal(logits(exported, batch), logits(ours, batch))
    assert (run / "final" / "hf" / "generation_config.json").is_file()

    if strategy in ("fsdp", "zero3", "single"):  # DCP, DeepSpeed's and the full format, at the last step
        last = run / "checkpoints" / "step_00000002"
        out = export(last, tmp_path / "exported", "--format", "hf")
        assert out.returncode == 0, out.stderr
        again = safetensors_state(tmp_path / "exported" / "model.safetensors")
        from_final = safetensors_state(run / "final" / "hf" / "model.safetensors")
        assert again.keys() == from_final.keys() and all(torch.equal(again[k], from_final[k]) for k in again)
        if strategy == "single":
            assert export(last, tmp_path / "w.safetensors", "--format", "safetensors").returncode == 0
            assert all(torch.equal(v, final[k]) for k, v in safetensors_state(tmp_path / "w.safetensors").items())


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_an_hf_directorys_tied_weights_are_read_into_a_model_built_on_meta(strategy, tmp_path):
    """model.name=hf with weights in model.path, no init_from: under fsdp and ZeRO-3 the same read
    as init_from, a tied weight (GPT-2's embedding and head) read once and still tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.hf_tiny import GPT2

    torch.manual_seed(9)
    reference = AutoModelForCausalLM.from_config(AutoConfig.for_model(**GPT2))
    reference.save_pretrained(tmp_path / "gpt2")
    cfg = yaml.safe_load(config_file(tmp_path, tmp_path / "gpt2").read_text())
    cfg["model"] = {"name": "hf", "path": str(tmp_path / "gpt2")}
    (tmp_path / "gpt2.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    run_train(["--config", tmp_path / "gpt2.yaml", f"run.dir={run}", *STRATEGIES[strategy][0]], nproc=2)
    assert META_LINE in (run / "logs" / "rank0.log").read_text()
    with torch.no_grad():
        expected = reference(**first_batch()).loss.item()
    assert metrics(run, "train")[0]["loss"] == pytest.approx(expected, abs=1e-6)
    final = final_weights(run)
    assert torch.equal(final["lm_head.weight"], final["transformer.wte.weight"])  # trained as one tensor
    assert not torch.equal(final["lm_head.weight"], reference.lm_head.weight)


def test_a_resume_takes_the_checkpoint_not_the_init_weights(pretrained, tmp_path):
    run = tmp_path / "run"
    config = config_file(tmp_path, pretrained)
    run_train(["--config", config, f"run.dir={run}"])
    first = final_weights(run)
    # the init file is gone: a resume must not read it (and must not need it)
    moved = tmp_path / "moved"
    pretrained.rename(moved)
    try:
        run_train(["--config", config, f"run.dir={run}", "train.max_steps=3"])
    finally:
        moved.rename(pretrained)
    assert metrics(run, "train")[-1]["step"] == 3 and not torch.equal(final_weights(run)["lm_head.weight"],
                                                                      first["lm_head.weight"])


@pytest.mark.parametrize("setup, match", [
    (lambda d, p: (d / "absent", {}), "no weights at"),
    (lambda d, p: (_corrupt(d), {}), "is not a readable safetensors file"),
    (lambda d, p: (p, {"config": {**MODEL, "num_hidden_layers": 3}}), "missing model.layers.2"),
])
def test_bad_init_files_exit_2_with_one_line_and_write_nothing(pretrained, tmp_path, setup, match):
    init_from, model = setup(tmp_path, pretrained)
    run = tmp_path / "run"
    proc = run_train(["--config", config_file(tmp_path, init_from, **model), f"run.dir={run}"], check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("distrain: error: config key 'model.init_from'") and match in line, proc.stderr
    assert not (run / "checkpoints").exists()


def _corrupt(directory):
    path = directory / "bad.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    return path
