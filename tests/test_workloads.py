"""Each seed workload trains on tiny local data in torchvision's on-disk formats, and learns."""
import pickle
import struct

import numpy as np
import pytest

from conftest import CONFIGS, final_weights, metrics, run_train, train_inprocess


def write_mnist(root, n_train=256, n_test=64):
    """IDX files as MNIST ships them; images carry a learnable class-dependent pattern."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 * y : 2 * y + 6, 4:24] = 255
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def write_cifar10(root, n_per_batch=64):
    """Pickled batches in the python CIFAR-10 layout."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, n_per_batch).tolist()
        data = rng.integers(0, 80, (n_per_batch, 3, 32, 32), dtype=np.uint8)
        for i, y in enumerate(labels):
            data[i, y % 3, 3 * y : 3 * y + 3, :] = 255
        with open(base / name, "wb") as f:
            pickle.dump({"data": data.reshape(n_per_batch, -1), "labels": labels}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)


def train_losses(run_dir):
    return [r["loss"] for r in metrics(run_dir, "train")]


def assert_learns(run_dir):
    losses = train_losses(run_dir)
    assert len(losses) >= 6
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses


@pytest.mark.parametrize("config, steps, extra", [
    ("mnist_mlp", 30, []),
    ("mnist_cnn", 30, ["optim.lr=0.02"]),
])
def test_mnist_workloads_learn(config, steps, extra, tmp_path):
    write_mnist(tmp_path / "data")
    run = tmp_path / "run"
    assert train_inprocess(["--config", CONFIGS / f"{config}.yaml", f"run.dir={run}", f"data.root={tmp_path / 'data'}",
                            "train.epochs=null", f"train.max_steps={steps}", "train.log_every=2",
                            "data.global_batch_size=32", "checkpoint.every_steps=0", "strategy.name=single", *extra]) == 0
    assert_learns(run)
    assert metrics(run, "eval")[-1]["samples"] == 64


@pytest.mark.parametrize("config, extra", [
    ("cifar10_lenet", ["optim.name=adamw", "optim.lr=0.003", "train.max_steps=24", "train.log_every=3",
                       "data.global_batch_size=32"]),
    ("cifar10_resnet18", ["optim.lr=0.02", "data.num_workers=0", "train.precision=fp32", "sched.warmup_steps=0",
                          "train.max_steps=8", "train.log_every=1", "data.global_batch_size=16"]),
])
def test_cifar10_workloads_learn(config, extra, tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    write_cifar10(tmp_path / "data")
    # the files are ours, not the published ones, so their checksums differ
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    run = tmp_path / "run"
    assert train_inprocess(["--config", CONFIGS / f"{config}.yaml", f"run.dir={run}", f"data.root={tmp_path / 'data'}",
                            "train.epochs=null", "checkpoint.every_steps=0", "strategy.name=single", *extra]) == 0
    assert_learns(run)


def test_regression_learns(tmp_path):
    run = tmp_path / "run"
    assert train_inprocess(["--config", CONFIGS / "regression.yaml", f"run.dir={run}", "train.epochs=2",
                            "train.log_every=8"]) == 0
    assert_learns(run)
    assert "accuracy" not in metrics(run, "eval")[-1]


def test_gpt_tiny_learns(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    run = tmp_path / "run"
    assert train_inprocess(["--config", CONFIGS / "gpt_tiny.yaml", f"run.dir={run}", f"data.path={text}",
                            "train.max_steps=40", "train.log_every=5", "data.global_batch_size=8"]) == 0
    assert_learns(run)
    weights = final_weights(run)
    assert "blocks.1.qkv.weight" in weights


def test_gpt_flops_count_parameters_that_zero3_partitioned(tmp_path):
    """ZeRO-3 leaves an empty tensor in each parameter's place; the MFU's FLOP count must not shrink."""
    import torch

    from distrain.models.gpt import gpt

    model = gpt(vocab_size=50, seq_len=16, n_layer=2, n_head=2, d_model=32)
    full = model.flops_per_token()
    for p in model.parameters():
        p.ds_numel, p.data = p.numel(), torch.empty(0)
    assert model.flops_per_token() == full
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 50)
    run = tmp_path / "run"
    run_train(["--config", CONFIGS / "gpt_tiny.yaml", f"run.dir={run}", f"data.path={text}", "train.max_steps=4",
               "train.log_every=2", "data.global_batch_size=8", "strategy.name=deepspeed", "strategy.zero_stage=3"])
    assert metrics(run, "train")[-1]["step"] == 4


def test_digits_demo_reaches_95_percent(tmp_path):
    run = tmp_path / "run"
    assert train_inprocess(["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={run}"]) == 0
    final = metrics(run, "eval")[-1]
    assert final["samples"] == 360 and final["accuracy"] >= 0.95


def test_same_config_twice_gives_identical_weights(tmp_path):
    args = ["--config", CONFIGS / "digits_mlp.yaml", "train.epochs=3", "strategy.name=single",
            "data.global_batch_size=32", "data.micro_batch_size=8"]
    assert train_inprocess([*args, f"run.dir={tmp_path / 'a'}"]) == 0
    assert train_inprocess([*args, f"run.dir={tmp_path / 'b'}"]) == 0
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(a[k].equal(b[k]) for k in a)


def test_final_model_loads_into_the_bare_model(tmp_path):
    import torch

    from distrain.models.vision import mlp

    run = tmp_path / "run"
    assert train_inprocess(["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={run}", "train.epochs=1"]) == 0
    model = mlp((1, 8, 8), 10, [128, 128])
    model.load_state_dict(torch.load(run / "final" / "model.pt", weights_only=True))
    assert (run / "config.yaml").exists() and (run / "logs" / "rank0.log").exists()


def test_dataloader_workers_see_the_same_batches(tmp_path):
    """num_workers > 0 goes through a DataLoader with prefetching; the order and weights must not change,
    and a resume mid-epoch must not skip what the workers had prefetched."""
    args = ["--config", CONFIGS / "digits_mlp.yaml", "strategy.name=single", "train.epochs=null",
            "train.max_steps=30", "checkpoint.every_steps=7"]
    assert train_inprocess([*args, f"run.dir={tmp_path / 'inline'}"]) == 0
    assert train_inprocess([*args, f"run.dir={tmp_path / 'workers'}", "data.num_workers=2"]) == 0
    a, b = final_weights(tmp_path / "inline"), final_weights(tmp_path / "workers")
    assert all(a[k].equal(b[k]) for k in a)
    resumed = tmp_path / "resumed"
    assert train_inprocess([*args[:-2], "train.max_steps=10", "checkpoint.every_steps=7", f"run.dir={resumed}",
                            "data.num_workers=2"]) == 0
    assert train_inprocess([*args, f"run.dir={resumed}", "data.num_workers=2", "checkpoint.resume="
                            f"{resumed / 'checkpoints' / 'step_00000007'}"]) == 0
    c = final_weights(resumed)
    assert all(a[k].equal(c[k]) for k in a)
