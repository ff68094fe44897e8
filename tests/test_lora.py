"""model.lora: peft LoRA adapters on a pretrained base (model.init_from), real processes.
Only the adapters train; checkpoints hold the adapters, their optimizer state and the trainer
state; final/adapter/ is peft's format and final/ holds the merged model; a run killed and
relaunched ends where an uninterrupted one does, also on another world size."""
from __future__ import annotations

import shutil
import sys

import pytest
import torch
import yaml

from conftest import extended, final_weights, max_abs_diff, run_train
from distrain.config import ConfigError, ModelConfig
from distrain.data.batch import collate
from distrain.models import build_model
from tests.hf_tiny import LLAMA, masked_samples, save_causal_lm
from tests.test_export_formats import export, safetensors_state

torch.set_num_threads(1)

# wide enough that the adapters' tensors, not the checkpoint formats' per-tensor overhead, make
# up a checkpoint; the adapters (r=32 on q and v) are still ~1/40 of the base
BASE = {**LLAMA, "hidden_size": 512, "intermediate_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 4}
LORA = {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
STRATEGIES = {"single": ([], 0), "ddp": (["strategy.name=ddp"], 2), "fsdp": (["strategy.name=fsdp"], 2),
              "zero2": (["strategy.name=deepspeed", "strategy.zero_stage=2"], 2),
              "zero3": (["strategy.name=deepspeed", "strategy.zero_stage=3"], 2),
              "zero2_bf16": (["strategy.name=deepspeed", "strategy.zero_stage=2", "train.precision=bf16"], 2)}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return save_causal_lm(tmp_path_factory.mktemp("base") / "llama", BASE, seed=7, max_shard_size="8MB")


def config_file(tmp_path, pretrained, name="hf", **model):
    cfg = {"run": {"seed": 0},
           "model": {"name": name, "config": BASE, "init_from": str(pretrained), "lora": LORA, **model},
           "data": {"name": "tests.hf_tiny:masked_tokens", "global_batch_size": 8, "eval_batch_size": 8},
           "optim": {"name": "adamw", "lr": 1e-3}, "sched": {"name": "constant"},
           "train": {"max_steps": 4, "log_every": 1}, "checkpoint": {"every_steps": 2}, "log": {"progress": "off"}}
    path = tmp_path / f"lora-{len(list(tmp_path.glob('lora-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def built(**lora):
    return build_model(ModelConfig(name="hf", lora={**LORA, **lora}, args={"config": LLAMA}),
                       {"task": "lm", "vocab_size": LLAMA["vocab_size"]})


def test_only_the_adapters_train_as_peft_counts_them():
    model = built()
    trainable, _ = model.get_nb_trainable_parameters()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable > 0
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("lora, key, match", [
    ({"target_modules": ["nope_proj"]}, "model.lora.target_modules", "no module named 'nope_proj'.*q_proj"),
    ({"rank": 4}, "model.lora.rank", "unknown key"),
])
def test_lora_mistakes_name_the_key(lora, key, match):
    with pytest.raises(ConfigError, match=match) as e:
        built(**lora)
    assert e.value.key == key


def test_without_peft_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import now fails as if it were not installed
    with pytest.raises(ConfigError, match=r"needs peft: pip install") as e:
        built()
    assert e.value.key == "model.lora"


def test_a_missing_target_module_exits_2_with_one_line(pretrained, tmp_path):
    proc = run_train(["--config", config_file(tmp_path, pretrained, lora={**LORA, "target_modules": ["qproj"]}),
                      f"run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "model.lora.target_modules" in line and "'qproj'" in line


def assert_export_is_the_final_model(run, checkpoint, tmp_path):
    """`distrain export --format hf` of the last checkpoint (adapters only) completes it from the
    base and merges it, as the run's own final/hf/ holds it."""
    out = tmp_path / "exported"
    proc = export(checkpoint, out, "--format", "hf")
    assert proc.returncode == 0, proc.stderr
    ours, final = safetensors_state(out / "model.safetensors"), safetensors_state(run / "final" / "hf" / "model.safetensors")
    assert ours.keys() == final.keys() and all(torch.equal(ours[k], final[k]) for k in ours)


def tensor_bytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("strategy", extended(["single", "zero2", "zero3"], {"zero2"}))
def test_lora_trains_checkpoints_its_adapters_only_and_exports_peft_and_merged(strategy, pretrained, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    args, nproc = STRATEGIES[strategy]
    run_train(["--config", config_file(tmp_path, pretrained), f"run.dir={run}", *args], nproc=nproc)

    adapter = load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))
    checkpoint = run / "checkpoints" / "step_00000004"
    on_disk = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file() and f.suffix != ".py")
    trainer_state = sum(f.stat().st_size for f in [checkpoint / "trainer.pt", *(checkpoint / "rng").iterdir()])
    # the weights and AdamW's two moments, once: under DeepSpeed only its world-size-free copy,
    # without DeepSpeed's own files (a second copy, with an fp32 master besides)
    expected = 3 * tensor_bytes(adapter) + trainer_state
    base_bytes = sum(f.stat().st_size for f in pretrained.glob("*.safetensors"))
    assert on_disk <= 1.2 * expected and on_disk < base_bytes / 10, (on_disk, expected, base_bytes)
    if strategy != "single":
        assert [f.name for f in (checkpoint / "deepspeed").iterdir()] == ["universal.pt"]

    base = AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True)
    merged = AutoModelForCausalLM.from_pretrained(run / "final" / "hf", local_files_only=True)
    batch = {k: v for k, v in collate(masked_samples(4, 12, seed=3)).items() if k != "labels"}
    with torch.no_grad():
        merged_logits = merged(**batch).logits
        peft_logits = PeftModel.from_pretrained(base, run / "final" / "adapter")(**batch).logits
    assert torch.allclose(peft_logits, merged_logits, atol=1e-5)
    final = final_weights(run)
    assert final.keys() == merged.state_dict().keys()  # model.pt holds the merged model too
    pretrained_state = AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True).state_dict()
    assert torch.equal(final["model.layers.0.mlp.up_proj.weight"], pretrained_state["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(final["model.layers.0.self_attn.q_proj.weight"],
                           pretrained_state["model.layers.0.self_attn.q_proj.weight"])
    if strategy == "zero3":  # DeepSpeed's files; the kill test below exports DCP's
        assert_export_is_the_final_model(run, checkpoint, tmp_path)


@pytest.mark.parametrize("strategy", extended(["ddp", "fsdp", "zero2", "zero2_bf16"], {"ddp", "zero2", "zero2_bf16"}))
def test_a_killed_lora_run_resumes_exactly(strategy, pretrained, tmp_path):
    """The relaunch builds fresh adapters (lora_B zero, as peft starts them): every rank's adapter
    weights and optimizer state must come back from the checkpoint for the ends to match. Under
    DeepSpeed in bf16 that is the fp32 master weights: the bf16 copy alone would end elsewhere."""
    args, nproc = STRATEGIES[strategy]
    reference = tmp_path / "reference"
    run_train(["--config", config_file(tmp_path, pretrained), f"run.dir={reference}", *args], nproc=nproc)

    killed = tmp_path / "killed"
    marker = tmp_path / "killed.marker"
    killable = config_file(tmp_path, pretrained, name="tests.hf_tiny:killable_hf", kill_at=2, marker=str(marker))
    # SIGTERM (torchrun stopping the surviving rank) ends a rank at once instead of asking for a checkpoint
    args = [*args, "checkpoint.preempt_signals=[SIGUSR1]"]
    proc = run_train(["--config", killable, f"run.dir={killed}", *args], nproc=nproc, check=False)
    assert proc.returncode != 0 and list(tmp_path.glob("killed.marker.rank*"))
    assert (killed / "checkpoints" / "step_00000002").is_dir() and not (killed / "final").exists()
    other_world = strategy in ("fsdp", "zero2")
    if other_world:
        shutil.copytree(killed, tmp_path / "one_rank")
    run_train(["--config", killable, f"run.dir={killed}", *args], nproc=nproc)
    assert max_abs_diff(final_weights(killed), final_weights(reference)) == 0
    if other_world:
        assert_export_is_the_final_model(killed, killed / "checkpoints" / "step_00000004", tmp_path)
    if strategy == "zero2_bf16":  # what was saved is the fp32 masters final/ holds, not bf16 values
        from safetensors.torch import load_file

        saved = torch.load(killed / "checkpoints" / "step_00000004" / "deepspeed" / "universal.pt",
                           weights_only=True)["params"]
        final = load_file(str(killed / "final" / "adapter" / "adapter_model.safetensors"))
        assert len(saved) == len(final) > 0
        assert all(torch.equal(v, final[k.replace(".default", "")]) for k, v in saved.items())
        assert any(not torch.equal(v, v.bfloat16().float()) for v in saved.values())

    if other_world:  # the same checkpoint, resumed by one process
        run_train(["--config", killable, f"run.dir={tmp_path / 'one_rank'}", *args], nproc=1)
        assert max_abs_diff(final_weights(tmp_path / "one_rank"), final_weights(reference)) < 1e-5


def test_a_resume_refuses_init_weights_that_changed(pretrained, tmp_path):
    """Checkpoints leave the frozen base out: it must come back from the same file."""
    copy = tmp_path / "copy"
    shutil.copytree(pretrained, copy)
    run = tmp_path / "run"
    run_train(["--config", config_file(tmp_path, copy), f"run.dir={run}", "train.max_steps=2"])
    from safetensors.torch import load_file, save_file

    shard = sorted(copy.glob("model-*.safetensors"))[0]
    state = load_file(str(shard))
    save_file({k: v + 1 for k, v in state.items()}, str(shard), metadata={"format": "pt"})
    proc = run_train(["--config", config_file(tmp_path, copy), f"run.dir={run}"], check=False)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "model.init_from" in line and "is not the file the checkpoint's frozen weights came from" in line
    assert not (run / "checkpoints" / "step_00000004").exists()


def test_a_users_own_peft_builder_gets_the_same_treatment(pretrained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    config = config_file(tmp_path, pretrained, name="tests.lora_tiny:peft_llama", lora=None)
    run_train(["--config", config, f"run.dir={run}"])
    saved = torch.load(run / "checkpoints" / "step_00000004" / "model.pt", weights_only=True)["model"]
    assert saved and all(".lora_" in k for k in saved)  # the frozen base is left out
    assert (run / "final" / "adapter" / "adapter_config.json").is_file()
    batch = {k: v for k, v in collate(masked_samples(2, 12, seed=4)).items() if k != "labels"}
    base = AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True)
    merged = AutoModelForCausalLM.from_pretrained(run / "final" / "hf", local_files_only=True)
    with torch.no_grad():
        assert torch.allclose(PeftModel.from_pretrained(base, run / "final" / "adapter")(**batch).logits,
                              merged(**batch).logits, atol=1e-5)
