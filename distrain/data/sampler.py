"""Resumable distributed sampling, with the data position counted in global samples.

Each epoch is one permutation of the dataset, drawn from (seed, epoch) alone. An
optimizer step consumes the next `global_batch_size` entries of it (fewer at the end
of the epoch); rank r of W takes the r-th of W near-equal contiguous slices of that
global batch and cuts it into micro-batches. Every rank runs the same number of
micro-batches per step, so collectives always match: a rank short of samples gets an
empty micro-batch, which the trainer runs with zero weight.

The state is two integers, {epoch, position}, independent of the world size, so a
run can stop anywhere and resume on any number of ranks without losing or repeating
a sample of the epoch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@functools.lru_cache(maxsize=2)
def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Shared, not copied, by the samplers that ask for it (the loader's prefetching one and the
    position's): 8 bytes per sample once. Read only."""
    g = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(n, generator=g)


def even_slice(n: int, parts: int, index: int) -> tuple[int, int]:
    """Bounds of slice `index` when n items are cut into `parts` contiguous near-equal slices."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass
class StepBatch:
    micro_batches: list[torch.Tensor]  # this rank's dataset indices, one tensor per micro-batch
    real: list[int]  # 0 marks a stand-in micro-batch (one sample, zero weight) on a rank with none left
    global_size: int  # samples in this step over all ranks, for the loss normalisation


class ResumableSampler:
    def __init__(self, n: int, global_batch: int, micro_batch: int, world_size: int, rank: int, seed: int):
        if n <= 0:
            raise ValueError("the training set is empty")
        self.n, self.global_batch, self.micro_batch = n, global_batch, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.n // self.global_batch)

    def next_step(self) -> StepBatch:
        """The indices of the next optimizer step; advances the position."""
        if self.position >= self.n:
            self.epoch, self.position = self.epoch + 1, 0
        if self._perm is None or self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.n, self.seed, self.epoch), self.epoch
        size = min(self.global_batch, self.n - self.position)
        start = self.position
        self.position += size
        if size == self.global_batch and self.global_batch == self.micro_batch * self.world_size:
            # the common case, kept cheap (one slice): one full micro-batch per rank
            lo = start + self.rank * self.micro_batch
            return StepBatch([self._perm[lo : lo + self.micro_batch]], [self.micro_batch], size)
        batch = self._perm[start : start + size]
        lo, hi = even_slice(size, self.world_size, self.rank)
        mine = batch[lo:hi]
        largest_share = even_slice(size, self.world_size, 0)[1]
        n_micro = max(1, -(-largest_share // self.micro_batch))
        micro = [mine[i * self.micro_batch : (i + 1) * self.micro_batch] for i in range(n_micro)]
        real = [len(m) for m in micro]
        micro = [m if len(m) else batch[:1] for m in micro]
        return StepBatch(micro, real, size)

    @property
    def epoch_done(self) -> bool:
        return self.position >= self.n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(n: int, batch_size: int, world_size: int, rank: int) -> list[tuple[int, range]]:
    """(global batch number, index range) of this rank's eval batches, padded with empty ones.

    Batches are cut from the eval set in order and dealt round-robin, so each batch has
    the same samples on any world size (hence identical per-batch results), and every
    rank gets the same number of forward passes (needed by sharded strategies).
    """
    total = -(-n // batch_size)
    per_rank = -(-total // world_size)
    out = []
    for k in range(per_rank):
        b = k * world_size + rank
        out.append((b, range(b * batch_size, min(n, (b + 1) * batch_size)) if b < total else range(0)))
    return out


def _mix(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 12_345) % (2**63 - 1)
