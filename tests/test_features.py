"""Precision, compile, activation checkpointing, DataParallel fallback, schedules, optimizers."""
import math

import pytest
import torch

from conftest import CONFIGS, final_weights, max_abs_diff, metrics, run_train, train_inprocess
from distrain.config import OptimConfig, SchedConfig
from distrain.optim import build_optimizer, lr_at

SHORT = ["--config", CONFIGS / "digits_mlp.yaml", "train.epochs=null", "train.max_steps=12", "train.log_every=3",
         "checkpoint.every_steps=0", "model.hidden=[32,32]", "optim.lr=0.01"]


@pytest.mark.parametrize("model, make_input", [
    ("gpt", lambda: torch.randint(0, 50, (3, 16))),
    ("resnet18", lambda: torch.randn(2, 3, 16, 16)),
])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(model, make_input):
    from distrain.models.gpt import gpt
    from distrain.models.vision import resnet18

    def run(ac):
        torch.manual_seed(0)
        m = gpt(vocab_size=50, seq_len=16, activation_checkpointing=ac) if model == "gpt" else \
            resnet18((3, 16, 16), 10, activation_checkpointing=ac)
        torch.manual_seed(1)
        loss = m(make_input()).float().pow(2).mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}

    (loss_a, grads_a), (loss_b, grads_b) = run(False), run(True)
    assert loss_a == loss_b
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_activation_checkpointing_is_refused_for_models_without_it(tmp_path, capsys):
    assert train_inprocess([*SHORT, f"run.dir={tmp_path}", "train.activation_checkpointing=true"]) == 2
    assert "'train.activation_checkpointing'" in capsys.readouterr().err


def test_compile_on_cpu(tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_train([*SHORT, f"run.dir={eager}", "strategy.name=single"])
    run_train([*SHORT, f"run.dir={compiled}", "strategy.name=single", "train.compile=true"], timeout=300)
    assert max_abs_diff(final_weights(eager), final_weights(compiled)) <= 1e-5
    assert not any(k.startswith("_orig_mod") for k in final_weights(compiled))


@pytest.mark.parametrize("strategy", [["strategy.name=ddp"], ["strategy.name=fsdp"],
                                      ["strategy.name=deepspeed", "strategy.zero_stage=2"]],
                         ids=["ddp", "fsdp", "zero2"])
def test_bf16_on_two_ranks_learns_and_exports_fp32(strategy, tmp_path):
    run = tmp_path / "run"
    run_train([*SHORT, f"run.dir={run}", "train.precision=bf16", "train.max_steps=20", "sched.warmup_steps=2",
               "optim.lr=0.03", *strategy], nproc=2)
    losses = [r["loss"] for r in metrics(run, "train")]
    assert losses[-1] < 0.8 * losses[0]
    weights = final_weights(run)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_dp_without_gpus_runs_as_single(tmp_path, capsys):
    assert train_inprocess([*SHORT, f"run.dir={tmp_path / 'dp'}", "strategy.name=dp"]) == 0
    assert "running as a single process" in capsys.readouterr().err
    assert train_inprocess([*SHORT, f"run.dir={tmp_path / 'single'}", "strategy.name=single"]) == 0
    a, b = final_weights(tmp_path / "dp"), final_weights(tmp_path / "single")
    assert all(a[k].equal(b[k]) for k in a)


def test_schedules():
    warm = SchedConfig(name="constant", warmup_steps=4)
    assert [lr_at(s, 1.0, warm, 100) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    step = SchedConfig(name="step", step_size=10, gamma=0.5)
    assert [lr_at(s, 1.0, step, 100) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    cosine = SchedConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(10, 1.0, cosine, 110) == 1.0
    assert math.isclose(lr_at(60, 1.0, cosine, 110), 0.55)
    assert math.isclose(lr_at(110, 1.0, cosine, 110), 0.1)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_optimizers(name, cls):
    opt = build_optimizer(OptimConfig(name=name, lr=0.1, momentum=0.9, nesterov=name == "sgd", weight_decay=0.01),
                          [torch.nn.Parameter(torch.ones(2))])
    assert isinstance(opt, cls) and opt.defaults["weight_decay"] == 0.01
    if name == "sgd":
        assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


@pytest.mark.parametrize("cfg", [OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4),
                                 OptimConfig(name="adam", lr=1e-3, weight_decay=1e-4),
                                 OptimConfig(name="adamw", lr=1e-3, weight_decay=0.01),
                                 OptimConfig(name="rmsprop", lr=1e-3, momentum=0.9, weight_decay=1e-4)],
                         ids=lambda c: c.name)
def test_cpu_optimizers_update_bit_for_bit_like_torchs_defaults(cfg):
    """distrain's CPU optimizers (multi-tensor form) and its step (norm, update, clear) give exactly
    the weights of torch's own default loop."""
    from distrain.strategies.common import optimizer_step

    def train(make, by_distrain: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        opt = make(model)
        for i in range(20):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i))
            model(x).square().mean().backward()
            if by_distrain:
                norm = optimizer_step(opt, list(model.parameters()), None)
                assert norm.dim() == 0 and torch.isfinite(norm)
                assert all(p.grad is None for p in model.parameters())
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return model.state_dict()

    def reference(model):
        kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                "rmsprop": torch.optim.RMSprop}[cfg.name]
        extra = {"nesterov": True} if cfg.name == "sgd" else {}
        if cfg.name in ("sgd", "rmsprop"):
            extra["momentum"] = cfg.momentum
        return kind(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **extra)

    ours = train(lambda model: build_optimizer(cfg, model.parameters()), by_distrain=True)
    theirs = train(reference, by_distrain=False)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    untrained = train(lambda model: torch.optim.SGD(model.parameters(), lr=0.0), by_distrain=False)
    assert not torch.equal(ours["0.weight"], untrained["0.weight"])


def test_optimizer_step_goes_through_torchs_wrapper():
    """Step hooks run, and a running profiler sees the optimizer step: distrain's step is torch's own."""
    from torch.profiler import ProfilerActivity, profile

    from distrain.strategies.common import optimizer_step

    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(OptimConfig(name="adamw", lr=0.1), model.parameters())
    calls = []
    handle = opt.register_step_post_hook(lambda *a: calls.append(1))
    model(torch.ones(2, 3)).sum().backward()
    optimizer_step(opt, list(model.parameters()), None)
    assert calls == [1]
    handle.remove()
    model(torch.ones(2, 3)).sum().backward()
    optimizer_step(opt, list(model.parameters()), None)
    assert calls == [1] and opt.state[model.weight]["step"] == 2
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(torch.ones(2, 3)).sum().backward()
        optimizer_step(opt, list(model.parameters()), None)
    assert any(e.name.startswith("Optimizer.step#AdamW") for e in prof.events())


def test_garbage_collection_runs_on_every_rank_at_the_same_step_and_is_restored():
    """The automatic collector is off in the loop; young objects are collected exactly at every
    gc_every-th step (the same step on every rank), cyclic garbage included."""
    import gc
    import weakref

    from distrain import collector

    class Node:
        pass

    started = []

    def seen(phase, info):
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        with collector.lockstep(5) as collect:
            assert not gc.isenabled()
            cycle = Node()
            cycle.me = cycle
            ref = weakref.ref(cycle)
            del cycle
            started.clear()
            for step in range(1, 5):
                collect(step)
                [Node() for _ in range(2000)]  # enough allocations to trigger Python's automatic collection
            assert ref() is not None and started == []
            collect(5)
            assert ref() is None and started == [1]
        assert gc.isenabled()
        with collector.lockstep(0):
            assert gc.isenabled()  # 0: Python's own automatic collection
    finally:
        gc.callbacks.remove(seen)
        gc.enable()


def test_total_norm_fast_path_gives_get_total_norms_bits():
    """The one-group fast path must stay what torch's get_total_norm computes (it fails if torch
    changes either underneath it); mixed dtypes take torch's own grouping."""
    from distrain.strategies.common import total_norm

    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=g) * 10 for shape in [(64, 8), (8,), (3, 5, 7), (1,)]]
    assert torch.equal(total_norm(grads), torch.nn.utils.get_total_norm(grads).float())
    mixed = grads[:2] + [grads[2].double(), grads[3]]
    assert torch.allclose(total_norm(mixed), torch.nn.utils.get_total_norm(grads).float(), rtol=1e-6)
