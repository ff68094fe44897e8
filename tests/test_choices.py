"""What distrain derives from the config without training: the default run directory, the
backend and device, DeepSpeed's config (distrain's, merged with the user's), and the
optimizer step's gradient clipping."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import CONFIGS
from distrain.cluster import ClusterEnv
from distrain.config import load_config

DEMO = str(CONFIGS / "digits_mlp.yaml")


def test_run_dir_defaults_to_runs_name_and_progress_words_parse():
    assert load_config(DEMO, ["run.name=x"]).run_dir == Path("runs/x")
    assert load_config(DEMO, ["run.name=x", "run.dir=/tmp/y"]).run_dir == Path("/tmp/y")
    # YAML reads on/off as booleans: the words still mean the modes
    assert [load_config(DEMO, [f"log.progress={m}"]).log.progress for m in ("on", "off", "auto")] == ["on", "off", "auto"]


def test_backend_and_device_choices():
    from distrain.dist import choose_backend, choose_device
    from distrain.strategies import spec

    def backend(requested, name, cuda):
        return choose_backend(requested, cuda, collective=spec(name).needs_group)

    assert backend("auto", "ddp", cuda=True) == "nccl"
    assert backend("auto", "single", cuda=True) == backend("auto", "dp", cuda=True) == "gloo"
    assert backend("auto", "fsdp", cuda=False) == "gloo" and backend("gloo", "ddp", cuda=True) == "gloo"
    env = ClusterEnv(local_rank=1)
    assert choose_device(env, "cpu", spec("ddp").first_gpu) == torch.device("cpu")
    assert choose_device(env, "cuda", spec("ddp").first_gpu) == torch.device("cuda", 1)  # each rank its own GPU
    assert choose_device(env, "cuda", spec("dp").first_gpu) == torch.device("cuda", 0)  # DataParallel scatters from the first


def test_deepspeed_config_merges_the_users_over_distrains():
    from distrain.strategies.deepspeed import deepspeed_config

    cfg = load_config(DEMO, ["strategy.name=deepspeed", "strategy.zero_stage=3", "strategy.offload=optimizer+params",
                             "train.grad_clip=0.5",
                             "strategy.deepspeed={zero_optimization: {overlap_comm: true}, steps_per_print: 10}"])
    ds = deepspeed_config(SimpleNamespace(section=cfg.strategy, micro_batch=16, accumulation=2, precision="bf16",
                                          global_batch=cfg.data.global_batch_size, grad_clip=cfg.train.grad_clip))
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is True  # the user's key wins, distrain's others stay
    assert zero["offload_optimizer"] == {"device": "cpu"} and zero["offload_param"] == {"device": "cpu"}
    assert ds["steps_per_print"] == 10 and ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        cfg.data.global_batch_size, 16, 2)


@pytest.mark.parametrize("clip", [0.05, 100.0])  # clipping, and a limit the norm never reaches
def test_grad_clip_matches_torch_and_reports_the_norm_before_clipping(clip):
    from distrain.strategies.common import optimizer_step

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        torch.nn.functional.mse_loss(model(torch.randn(16, 8)), torch.randn(16, 4)).backward()
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    ours, opt = setup()
    norm = optimizer_step(opt, list(ours.parameters()), clip, None).item()
    theirs, ref_opt = setup()
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), clip).item()
    ref_opt.step()
    assert norm == pytest.approx(expected, rel=1e-6) and expected > 0.05
    assert all(torch.allclose(a, b, rtol=0, atol=1e-7) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert all(p.grad is None for p in ours.parameters())  # cleared for the next step


def test_distrain_command_dispatches_and_refuses_unknown_commands(tmp_path, capsys):
    from distrain.cli import main

    assert main(["train", "--config", DEMO, f"run.dir={tmp_path}", "optim.lrr=1"]) == 2  # reached train's checks
    assert "did you mean 'lr'" in capsys.readouterr().err
    assert main(["bogus"]) == 2 and "unknown command 'bogus'" in capsys.readouterr().err
    assert main([]) == 2 and main(["--help"]) == 0
