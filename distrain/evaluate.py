"""Exact distributed evaluation: every eval item counted once on any world size."""
from __future__ import annotations

import torch
from torch.utils.data import default_collate

from . import dist
from .data.batch import call_model, num_samples, to_device
from .data.sampler import eval_batches
from .objectives import summarize


@torch.no_grad()
def evaluate(strategy, dataset, objective, batch_size: int, device: torch.device, comm,
             collate=default_collate) -> dict:
    """Per-batch sums (loss, correct predictions, counted items, samples) on a fixed batch grid,
    gathered and added in batch order: the result is the same, bit for bit, on 1 or N ranks.
    Ranks with fewer batches run stand-ins that count for nothing."""
    n = len(dataset)
    mine = eval_batches(n, batch_size, dist.world_size(), dist.rank())
    total = -(-n // batch_size)
    rows = torch.zeros(total, 4, dtype=torch.float64)
    model = strategy.model
    was_training = model.training
    model.eval()
    with strategy.micro_step(sync=True):
        for b, idx in mine:
            batch = fetch(dataset, idx if len(idx) else range(1), device, collate)
            out = call_model(model, batch, objective.without_labels)
            if len(idx):
                loss_sum, correct, count = objective.eval_sums(out, batch)
                rows[b, 0] = loss_sum.double().item()
                rows[b, 1] = float(correct) if correct is not None else 0.0
                rows[b, 2] = float(count)
                rows[b, 3] = num_samples(batch)
    model.train(was_training)
    rows = comm.all_reduce_sum(rows.to(comm.device)).cpu()
    loss_sum, correct, count, samples = rows.sum(0).tolist()
    return summarize(loss_sum, correct, count, int(samples), objective)


def fetch(dataset, idx: range, device, collate=default_collate):
    """The samples idx as one batch on the device: in-memory tensor sets are sliced directly."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        sl = slice(idx.start, idx.stop)
        return tuple(t[sl].to(device) for t in tensors)
    return to_device(collate([dataset[i] for i in idx]), device)
