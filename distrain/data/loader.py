"""Turning index lists into device batches: direct tensor indexing for in-memory sets
(no DataLoader overhead), a DataLoader with workers for everything else."""
from __future__ import annotations

import collections
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, default_collate

from .batch import to_device
from .sampler import ResumableSampler, StepBatch


class StepLoader:
    """Yields, for each optimizer step, the StepBatch and this rank's micro-batches on the device:
    tuples, or dicts of tensors (data.batch), made by `collate` (the data builder's, if it gave one)."""

    finished = False  # a stream's loader says when train.epochs is over; the sampler's run is counted in steps

    def __init__(self, dataset, sampler: ResumableSampler, device: torch.device, num_workers: int, seed: int, rank: int,
                 collate=default_collate):
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.num_workers, self.seed, self.rank, self.collate = num_workers, seed, rank, collate
        self._iter = None
        self.direct = num_workers == 0 and isinstance(dataset, TensorDataset)  # tensor indexing, no DataLoader
        self.on_device = self.direct and dataset.tensors[0].device == device

    def next_step(self) -> tuple[StepBatch, list[tuple]]:
        if self.direct:
            step = self.sampler.next_step()
            tensors = self.dataset.tensors
            if self.on_device:
                if self.device.type != "cpu":  # a blocking copy of the indices would wait for the GPU each step
                    return step, [tuple(t.index_select(0, i.to(self.device, non_blocking=True)) for t in tensors)
                                  for i in step.micro_batches]
                # index_select: the same gather as t[i] at half its dispatch cost on a small batch
                return step, [tuple(t.index_select(0, i) for t in tensors) for i in step.micro_batches]
            return step, [tuple(t.index_select(0, i).to(self.device, non_blocking=True) for t in tensors)
                          for i in step.micro_batches]
        if self._iter is None:
            self._iter = self._worker_stream()
        return next(self._iter)

    def _worker_stream(self):
        pending: collections.deque[StepBatch] = collections.deque()

        def index_stream():  # runs in this process, in order, ahead of the consumer
            while True:
                step = self.sampler_copy.next_step()
                pending.append(step)
                yield from (m.tolist() for m in step.micro_batches)

        # the loader prefetches ahead, so it draws from a copy; self.sampler advances as steps are consumed
        self.sampler_copy = ResumableSampler(self.sampler.n, self.sampler.global_batch, self.sampler.micro_batch,
                                             self.sampler.world_size, self.sampler.rank, self.sampler.seed)
        self.sampler_copy.load_state_dict(self.sampler.state_dict())
        g = torch.Generator().manual_seed(self.seed * 1000 + self.rank)
        loader = DataLoader(self.dataset, batch_sampler=index_stream(), num_workers=self.num_workers,
                            collate_fn=self.collate, worker_init_fn=_seed_worker, generator=g,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        it = iter(loader)
        try:
            while True:
                first = next(it)
                step = pending.popleft()
                micro = [first] + [next(it) for _ in range(len(step.micro_batches) - 1)]
                self.sampler.next_step()
                yield step, [to_device(m, self.device) for m in micro]
        finally:
            del it  # stops the worker processes now, not at interpreter exit

    def sync(self, comm) -> None:
        """Nothing to gather: the sampler's position is the same on every rank."""

    def reset(self) -> None:
        """Forget prefetched batches (after the sampler state was restored)."""
        self.close()

    def close(self) -> None:
        if self._iter is not None:
            self._iter.close()
            self._iter = None


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
