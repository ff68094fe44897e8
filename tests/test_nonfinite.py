"""The non-finite guard: a non-finite loss or gradient skips the update or stops the run, on every
strategy and on the device path, and no checkpoint with non-finite weights is ever written."""
import pytest
import torch

from conftest import CONFIGS, metrics, run_train

DIGITS = ["--config", CONFIGS / "digits_mlp.yaml", "train.epochs=null", "checkpoint.every_steps=0",
          "model.hidden=[32,32]"]


@pytest.mark.parametrize("strategy, nproc", [("single", 0), ("deepspeed", 2)])
def test_exploding_lr_skip_mode_finishes_without_nan_checkpoints(strategy, nproc, tmp_path):
    run = tmp_path / "run"
    run_train([*explode(run, strategy), "train.on_nonfinite=skip"], nproc=nproc)
    assert metrics(run, "train")[-1]["skipped_steps"] > 0
    assert_no_nan_checkpoint(run)


@pytest.mark.parametrize("strategy, nproc", [("single", 0), ("deepspeed", 2)])
def test_exploding_lr_stop_mode_fails_without_nan_checkpoints(strategy, nproc, tmp_path):
    run = tmp_path / "run"
    proc = run_train([*explode(run, strategy), "train.on_nonfinite=stop"], nproc=nproc, check=False)
    assert proc.returncode != 0 and "non-finite loss or gradient norm at step" in proc.stderr
    if nproc == 0:  # the contract for a failure: exit 1, one line on stderr, the traceback in the rank's log
        assert proc.returncode == 1
        assert [line for line in proc.stderr.splitlines() if line.strip()] == [
            next(line for line in proc.stderr.splitlines() if "training failed on rank 0" in line)]
        assert "Traceback (most recent call last)" in (run / "logs" / "rank0.log").read_text()
    assert_no_nan_checkpoint(run)


def explode(run, strategy):
    return [*DIGITS, f"run.dir={run}", "train.max_steps=12", "optim.name=sgd", "optim.lr=1e30",
            "sched.name=constant", "sched.warmup_steps=0", "checkpoint.every_steps=1", f"strategy.name={strategy}"]


def assert_no_nan_checkpoint(run):
    files = list(run.glob("checkpoints/step_*/**/*.pt")) + list(run.glob("final/*.pt"))
    for f in files:
        state = torch.load(f, weights_only=False)
        for t in tensors(state):
            assert torch.isfinite(t).all(), f


def tensors(obj):
    if torch.is_tensor(obj):
        if obj.is_floating_point():
            yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_optimizer_step_skips_exactly_the_non_finite_updates(clip, bad):
    """A bad step moves nothing (weights, moments, step count) and says so by a non-finite norm; a
    good one equals torch's own clip-and-step; gradients are cleared either way."""
    from distrain.strategies.common import optimizer_step

    layers = [torch.nn.Linear(4, 3) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    opts = [torch.optim.AdamW(layer.parameters(), lr=0.1) for layer in layers]
    for layer, opt in zip(layers, opts):  # one clean step first: moments exist
        layer(torch.ones(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        layer(torch.arange(8.0).view(2, 4)).sum().backward()
        if bad is not None:
            layer.bias.grad[1] = bad
    before = {k: v.clone() for k, v in opts[0].state_dict()["state"][0].items()}
    weights = [p.detach().clone() for p in layers[0].parameters()]
    norm = optimizer_step(opts[0], list(layers[0].parameters()), clip)
    assert torch.is_tensor(norm) and norm.dim() == 0 and bool(torch.isfinite(norm)) == (bad is None)
    assert all(p.grad is None for p in layers[0].parameters())
    if bad is None:
        if clip:
            torch.nn.utils.clip_grad_norm_(layers[1].parameters(), clip)
        opts[1].step()
        assert all(torch.equal(a, b) for a, b in zip(layers[0].parameters(), layers[1].parameters()))
    else:
        assert all(torch.equal(a, p) for a, p in zip(weights, layers[0].parameters()))
        after = opts[0].state_dict()["state"][0]
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_skipped_steps_are_counted_and_stop_the_run_when_read(tmp_path):
    """The norms are read at log lines and checkpoints: skip counts every skipped step, stop fails
    the run naming the step, and no checkpoint holds a non-finite value."""
    from distrain.train import main

    skip, stop = tmp_path / "skip", tmp_path / "stop"
    assert main([*map(str, explode(skip, "single")), "train.log_every=4", "checkpoint.every_steps=0",
                 "train.on_nonfinite=skip"]) == 0
    assert metrics(skip, "train")[-1]["skipped_steps"] > 0
    assert_no_nan_checkpoint(skip)
    assert main([*map(str, explode(stop, "single")), "train.log_every=4", "checkpoint.every_steps=3",
                 "train.on_nonfinite=stop"]) != 0
    assert "non-finite loss or gradient norm at step" in (stop / "logs" / "rank0.log").read_text()
    assert_no_nan_checkpoint(stop)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_finiteness_check_covers_every_floating_dtype(bad):
    from distrain.strategies import common

    tensors = [torch.ones(5, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float32),
               torch.ones(4, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float16)]
    if bad is not None:
        tensors[2][1] = bad
    assert common.all_finite(tensors) == (bad is None)
    assert common.all_finite(tensors[:2])
