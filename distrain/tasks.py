"""Losses and metrics by task. Losses are per sample, so a step can normalise by the
number of samples in the global batch whatever way it is split over ranks and micro-batches."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def per_sample_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return F.cross_entropy(output.float(), target, reduction="none")
    if task == "regression":
        return F.mse_loss(output.float(), target.float(), reduction="none").flatten(1).mean(1)
    if task == "lm":
        b, t, v = output.shape
        return F.cross_entropy(output.float().reshape(b * t, v), target.reshape(b * t), reduction="none").view(b, t).mean(1)
    raise ValueError(f"unknown task {task!r}")


def mean_loss(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean of per_sample_loss, with the fused reductions a hand-written loop would use."""
    if task == "classification":
        return F.cross_entropy(output.float(), target)
    if task == "lm":
        return F.cross_entropy(output.float().flatten(0, 1), target.flatten())
    return per_sample_loss(task, output, target).mean()


def correct(task: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """Correct predictions in the batch (tokens for lm), or None where accuracy has no meaning."""
    if task == "classification":
        return (output.argmax(-1) == target).sum()
    if task == "lm":
        return (output.argmax(-1) == target).float().mean(1).sum()
    return None
