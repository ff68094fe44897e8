"""Built-in datasets. Each builder returns (train, eval, meta); meta tells models and the
trainer the task and shapes: {"task", "in_shape", "num_classes" | "vocab_size", "seq_len"}.
In-memory sets are TensorDatasets, which the trainer indexes directly without a DataLoader.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..config import ConfigError


def digits(eval_size: int = 360):
    """The real 8x8 handwritten digits (1,797 images), shipped with the package; fixed split."""
    with np.load(Path(__file__).with_name("digits.npz")) as f:
        images, labels = f["images"], f["labels"]
    x = torch.from_numpy(images).float().div_(16.0).sub_(0.5).unsqueeze(1)
    y = torch.from_numpy(labels).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(20240501))
    tr, ev = order[:-eval_size], order[-eval_size:]
    meta = {"task": "classification", "in_shape": (1, 8, 8), "num_classes": 10}
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[ev], y[ev]), meta


def synthetic(task: str = "classification", n_train: int = 1024, n_eval: int = 256, dim: int = 10,
              num_classes: int = 4, noise: float = 0.1, seed: int = 0):
    """A seeded teacher problem: labels (or targets) from a fixed random linear map of gaussian inputs."""
    if task not in ("classification", "regression"):
        raise ConfigError("data.task", f"must be classification or regression (got {task!r})")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_eval, dim, generator=g)
    if task == "classification":
        w = torch.randn(dim, num_classes, generator=g)
        y = (x @ w).argmax(1)
        meta = {"task": task, "in_shape": (dim,), "num_classes": num_classes}
    else:
        w = torch.randn(dim, 1, generator=g)
        y = x @ w + noise * torch.randn(n_train + n_eval, 1, generator=g)
        meta = {"task": task, "in_shape": (dim,)}
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]), meta


def mnist(root: str = "data", download: bool = False):
    from torchvision.datasets import MNIST

    sets = [_torchvision(MNIST, "MNIST", root, download, train) for train in (True, False)]
    to_tensors = lambda ds: TensorDataset(  # noqa: E731
        ds.data.float().div_(255).sub_(0.1307).div_(0.3081).unsqueeze(1), ds.targets.long())
    return to_tensors(sets[0]), to_tensors(sets[1]), {"task": "classification", "in_shape": (1, 28, 28), "num_classes": 10}


def cifar10(root: str = "data", download: bool = False):
    from torchvision.datasets import CIFAR10

    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def to_tensors(ds):
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255)
        return TensorDataset((x - mean) / std, torch.tensor(ds.targets, dtype=torch.long))

    train, test = (_torchvision(CIFAR10, "CIFAR-10", root, download, t) for t in (True, False))
    return to_tensors(train), to_tensors(test), {"task": "classification", "in_shape": (3, 32, 32), "num_classes": 10}


def text(path: str = "README.md", seq_len: int = 64, eval_fraction: float = 0.1):
    """Character-level language modelling on any UTF-8 text file; non-overlapping windows."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("data.path", f"text file not found: {path}")
    chars = p.read_text(encoding="utf-8", errors="replace")
    vocab = sorted(set(chars))
    lut = {c: i for i, c in enumerate(vocab)}
    tokens = torch.tensor([lut[c] for c in chars], dtype=torch.long)
    n = (len(tokens) - 1) // seq_len
    if n < 2:
        raise ConfigError("data.path", f"{path} is too short for data.seq_len={seq_len}")
    windows = torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)])
    n_eval = max(1, int(n * eval_fraction))
    x, y = windows[:, :-1], windows[:, 1:]
    meta = {"task": "lm", "vocab_size": len(vocab), "seq_len": seq_len}
    return TensorDataset(x[:-n_eval], y[:-n_eval]), TensorDataset(x[-n_eval:], y[-n_eval:]), meta


def _torchvision(cls, label: str, root: str, download: bool, train: bool):
    try:
        return cls(root, train=train, download=download)
    except RuntimeError as e:
        if "not found" in str(e).lower():
            raise ConfigError("data.download", f"{label} files not found under {Path(root).resolve()}; "
                                               "set data.download=true or point data.root at them")
        raise
