"""A `train.loss` function: fn(output, batch) -> (loss_sum, count). distrain divides the sum
over the global batch by the global count, so return sums, never means."""
from __future__ import annotations

from torch.nn import functional as F


def token_cross_entropy(output, batch):
    """Next-token cross-entropy over the labels that are not -100 (Hugging Face's shift)."""
    logits = output["logits"][:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss_sum, (labels != -100).sum()
