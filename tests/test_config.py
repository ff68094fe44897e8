"""Every user mistake: exit code 2, one line on stderr naming the key, no traceback."""
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, ROOT, clean_env, train_inprocess
from distrain.config import ConfigError, batch_layout, load_config

DEMO = str(CONFIGS / "digits_mlp.yaml")
NEEDS_NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the mistake is asking for a GPU that is not there")


@pytest.mark.parametrize("overrides, key, words", [
    (["optim.lrr=0.1"], "optim.lrr", "did you mean 'lr'"),
    (["optimizer.lr=0.1"], "optimizer", "did you mean 'optim'"),
    (["optim.lr=fast"], "optim.lr", "must be a number"),
    (["train.log_every=1.5"], "train.log_every", "must be an integer"),
    (["train.compile=maybe"], "train.compile", "true or false"),
    (["optim.lr=0"], "optim.lr", "must be > 0"),
    (["optim.lr=-1"], "optim.lr", "must be > 0"),
    (["train.max_steps=10"], "train.max_steps", "exactly one"),
    (["train.epochs=null"], "train.max_steps", "exactly one"),
    (["optim.name=adamm"], "optim.name", "did you mean 'adam'"),
    (["model.name=resnet81"], "model.name", "did you mean 'resnet18'"),
    (["data.name=digit"], "data.name", "did you mean 'digits'"),
    (["model.hiden=[4]"], "model.hiden", "did you mean 'hidden'"),
    (["data.global_batch_size=64", "data.micro_batch_size=48"], "data.micro_batch_size", "does not divide"),
    (["data.global_batch_size=0"], "data.global_batch_size", "must be > 0"),
    (["strategy.name=horovod"], "strategy.name", "must be one of"),
    (["train.precision=fp16"], "train.precision", "needs a CUDA device"),
    (["model.name=nowhere.module:fn"], "model.name", "cannot import"),
    (["data.name=mnist", "data.root=/nonexistent"], "data.download", "data.download=true"),
    (["checkpoint.async_save=true"], "checkpoint.async_save", "fsdp"),
    (["nokey"], "", "section.key=value"),
    (["optim.betas=[0.9]"], "optim.betas", "two numbers in [0, 1)"),
    (["optim.nesterov=true"], "optim.nesterov", "optim.name=sgd"),
    (["checkpoint.preempt_signals=[SIGFOO]"], "checkpoint.preempt_signals", "unknown signal 'SIGFOO'"),
    (["strategy.zero_stage=4"], "strategy.zero_stage", "must be 0, 1, 2 or 3"),
    (["strategy.offload=optimizer"], "strategy.offload", "needs strategy.name=deepspeed"),
    (["strategy.name=deepspeed", "strategy.offload=optimizer+params"], "strategy.offload", "zero_stage=3"),
    pytest.param(["strategy.backend=nccl"], "strategy.backend", "nccl needs CUDA", marks=NEEDS_NO_GPU),
    pytest.param(["train.device=cuda"], "train.device", "no CUDA device", marks=NEEDS_NO_GPU),
])
def test_config_errors_exit_2_with_one_line(overrides, key, words, tmp_path, capsys):
    code = train_inprocess(["--config", DEMO, f"run.dir={tmp_path}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert f"'{key}'" in err if key else True
    assert words in err


def test_batch_that_does_not_divide_the_world_size():
    cfg = load_config(DEMO, ["data.global_batch_size=10"])
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        batch_layout(cfg, 3)
    assert batch_layout(cfg, 2) == (5, 1)
    assert batch_layout(load_config(DEMO, ["data.global_batch_size=12", "data.micro_batch_size=2"]), 3) == (2, 2)


def test_missing_config_file_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "distrain.train", "--config", "missing.yaml"], capture_output=True,
                          text=True, env=clean_env(), cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "distrain: error: config file not found: missing.yaml"


def test_print_config_resolves_overrides(capsys, tmp_path):
    import yaml

    from distrain.config import to_dict

    assert train_inprocess(["--config", DEMO, "--print-config", "optim.lr=0.5", "model.hidden=[8]"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5
    assert printed["model"] == {"name": "mlp", "init_from": None, "init_strict": True, "lora": None,
                                "hidden": [8]}
    assert printed["data"]["global_batch_size"] == 64
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert to_dict(load_config(str(tmp_path / "printed.yaml"))) == printed  # what is printed loads back the same


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(DEMO, ["optim.betas=[0.8, 0.9]", "train.grad_clip=1", "run.name=x", "optim.lr=3e-4"])
    assert cfg.optim.betas == [0.8, 0.9] and cfg.train.grad_clip == 1.0 and cfg.run.name == "x"
    assert cfg.optim.lr == 3e-4  # YAML 1.1 reads 3e-4 as a string; a float field takes it
