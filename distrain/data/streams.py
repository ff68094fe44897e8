"""Streams: IterableDatasets trained with an exact data position, kept per shard.

A stream is read by R = world size x max(1, data.num_workers) readers (one per rank, or one
per DataLoader worker). At the start of an epoch its shards are shuffled by (seed, epoch) and
dealt round-robin to the readers; a reader reads its shards one after the other, in order, and
cuts them into micro-batches (in the worker: collation runs in parallel). Each micro-batch
carries where it ends in each shard it touched; the rank records that when the step consumes
the batch, not when a worker prefetches it. A checkpoint sums the ranks' records into one
position: per shard, how many samples were used and whether it is finished, plus each rank's
next worker in the DataLoader's round-robin.

Resuming on the same world size and worker count keeps the deal and the round-robin: the
run continues bit for bit. On another one, the unfinished shards are dealt again with their
offsets: every sample of the epoch is still used exactly once, in another order.

Shards come from the dataset: `num_shards` and `iter_shard(index, start)` (samples of shard
`index` from sample `start` on), or a Hugging Face IterableDataset (`shard` + `skip`). A
stream with neither is read the way torch reads it (each reader iterates it whole and the
dataset splits itself, or not), with one warning: resume then skips each reader's consumed
samples, exact only on the same world size and worker count.
"""
from __future__ import annotations

import itertools
import logging
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from ..config import ConfigError
from .batch import num_samples, to_device
from .sampler import StepBatch, epoch_permutation
from .shards import RankReaders, Shards

log = logging.getLogger("distrain")


def stream_loader(cfg, data, comm, world_size: int, rank: int, collate):
    if cfg.train.max_steps is None and cfg.sched.name == "cosine":
        raise ConfigError("sched.name", "a cosine schedule needs the run's length, which a stream does not "
                                        "give: set train.max_steps")
    accumulation = -(-cfg.data.global_batch_size // (data.micro_batch * world_size))
    return StreamLoader(data.train, data.micro_batch, accumulation, world_size, rank, cfg.data.num_workers,
                        cfg.run.seed, data.device, comm, collate, None if cfg.train.max_steps else cfg.train.epochs)


class StreamLoader:
    """The StepLoader of a stream: yields (StepBatch, micro-batches on the device) per step and
    holds the data position (state_dict after `sync`, on every rank)."""

    steps_per_epoch = None

    def __init__(self, dataset, micro_batch: int, accumulation: int, world_size: int, rank: int, num_workers: int,
                 seed: int, device: torch.device, comm, collate=default_collate, epochs: int | None = None):
        self.shards, self.micro, self.accumulation = Shards(dataset), micro_batch, accumulation
        self.world_size, self.rank, self.workers = world_size, rank, max(1, num_workers)
        self.num_workers, self.seed, self.device, self.comm, self.collate = num_workers, seed, device, comm, collate
        self.epochs, self.finished = epochs, False
        self.readers = world_size * self.workers
        if self.shards.count is None:
            log.warning("data: %s has no shards (num_shards and iter_shard(index, start), or a Hugging Face "
                        "IterableDataset): each rank and worker reads it as torch does, and a resume skips the "
                        "samples each one used, exact only on the same world size and data.num_workers",
                        type(dataset).__name__)
        elif self.shards.count < self.readers:
            log.info("data: %d shards for %d readers (ranks x workers): %d readers stay idle", self.shards.count,
                     self.readers, self.readers - self.shards.count)
        self.epoch, self._standin, self._iter, self._ahead = 0, None, None, None
        self._deal(rotation=0)

    # -- the position
    @property
    def n_shards(self) -> int:
        return self.shards.count or self.readers

    def _deal(self, rotation: int, offset=None, done=None, owner=None) -> None:
        n = self.n_shards
        self.offset = list(offset) if offset is not None else [0] * n
        self.done = list(done) if done is not None else [False] * n
        if owner is None:
            order = epoch_permutation(n, self.seed, self.epoch).tolist() if self.shards.count else range(n)
            owner = [0] * n
            for k, s in enumerate(s for s in order if not self.done[s]):
                owner[s] = k % self.readers
        self.owner, self.rotation, self.next_worker = list(owner), rotation, rotation
        self._fresh = not any(self.offset) and not any(self.done)

    def _plan(self) -> dict[int, list[tuple[int, int]]]:
        """This rank's readers and the (shard, start) each reads, in the epoch's shard order."""
        order = epoch_permutation(self.n_shards, self.seed, self.epoch).tolist() if self.shards.count \
            else range(self.n_shards)
        first = self.rank * self.workers
        plan = {j: [] for j in range(first, first + self.workers)}
        for s in order:
            if self.owner[s] in plan and not self.done[s]:
                plan[self.owner[s]].append((s, self.offset[s]))
        return plan

    @property
    def position(self) -> int:
        return sum(self.offset)

    def sync(self, comm) -> None:
        """Collective: every rank's part of the position added into the whole (each shard has
        one owner), so that rank 0's state_dict holds it."""
        n, mine = self.n_shards, range(self.rank * self.workers, (self.rank + 1) * self.workers)
        local = torch.zeros(2 * n + self.world_size, dtype=torch.float64)
        for s in range(n):
            if self.owner[s] in mine:
                local[s], local[n + s] = self.offset[s], float(self.done[s])
        local[2 * n + self.rank] = self.next_worker
        total = comm.all_reduce_sum(local).long().tolist()
        self.offset, self.done = total[:n], [bool(d) for d in total[n : 2 * n]]
        self.all_next = total[2 * n :]

    def state_dict(self) -> dict:
        return {"stream": True, "epoch": self.epoch, "shards": self.shards.count, "readers": self.readers,
                "owner": self.owner, "offset": self.offset, "done": self.done,
                "next_worker": getattr(self, "all_next", [self.next_worker] * self.world_size)}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("stream"):
            raise ConfigError("data.name", "the checkpoint's data position is for a map-style dataset, and "
                                           "this run's training set is a stream: the data changed")
        if state["shards"] != self.shards.count:
            raise ConfigError("data.name", f"the checkpoint's stream had {state['shards']} shards, this one has "
                                           f"{self.shards.count}: the data changed")
        self.epoch = int(state["epoch"])
        if state["readers"] == self.readers:
            self._deal(int(state["next_worker"][self.rank]), state["offset"], state["done"], state["owner"])
        elif self.shards.count:
            self._deal(0, state["offset"], state["done"])
            log.info("data: the stream's unfinished shards dealt again over %d readers (was %d): every sample of "
                     "the epoch still once, in another order", self.readers, state["readers"])
        else:
            share = sum(state["offset"]) // self.readers
            self._deal(0, [share] * self.readers)
            log.warning("data: a stream without shards resumed on another world size or data.num_workers: each "
                        "reader skips %d samples, the data seen around the resume is approximate", share)
        self.reset()
        self.finished = self.epochs is not None and self.epoch >= self.epochs

    # -- batches
    def next_step(self) -> tuple[StepBatch, list]:
        step = self._ahead if self._ahead is not None else self._fetch()
        self._ahead = None
        batch, consumed = step
        for reader, ends in consumed:
            self._consume(reader, ends)
        if self.epochs is not None:  # one step ahead: the loop must know which step is the last
            self._ahead = self._fetch()
            self.finished = self._ahead is None
        return batch

    def _fetch(self):
        while True:
            micro, real, consumed = [], [], []
            for _ in range(self.accumulation):
                item = self._next_item()
                if item is None:
                    micro.append(self.standin())
                    real.append(0)
                else:
                    mb, reader, ends = item
                    micro.append(mb)
                    real.append(num_samples(mb))
                    consumed.append((reader, ends))
            total = int(self.comm.all_reduce_sum(torch.tensor([float(sum(real))], dtype=torch.float64)).item())
            if total:
                self._fresh = False
                return (StepBatch([None] * len(micro), real, total), [to_device(m, self.device) for m in micro]), \
                    consumed
            if self._fresh:  # the same on every rank: the sum says no rank had a sample
                raise ConfigError("data.name", "the training stream gave no samples")
            self.epoch += 1
            if self.epochs is not None and self.epoch >= self.epochs:
                return None
            self.close()
            self._deal(rotation=0)

    def _consume(self, reader: int, ends: dict) -> None:
        for shard, (offset, last) in ends.items():
            self.offset[shard], self.done[shard] = offset, last
        self.next_worker = (reader - self.rank * self.workers + 1) % self.workers

    def _next_item(self):
        if self._iter is None:
            self._iter = self._start()
        return next(self._iter, None)

    def _start(self):
        readers = RankReaders(self.shards, self._plan(), self.rank * self.workers, self.workers, self.rotation,
                              self.micro, self.collate)
        if self.num_workers == 0:
            return iter(readers)
        g = torch.Generator().manual_seed(self.seed * 1000 + self.rank)
        loader = DataLoader(readers, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is,
                            worker_init_fn=_seed_worker, generator=g, pin_memory=self.device.type == "cuda")
        return iter(loader)

    def standin(self):
        """A real batch run with zero weight where this rank has no data left: its first samples."""
        if self._standin is None:
            self._standin = self.collate(list(itertools.islice(self.shards.open(0, 0), 1)))
        return self._standin

    def first_batch(self, n: int = 2):
        return self.collate(list(itertools.islice(self.shards.open(0, 0), n)))

    def reset(self) -> None:
        self.close()
        self._ahead, self.finished = None, False

    def close(self) -> None:
        self._iter = None  # a DataLoader iterator stops its workers when dropped


def _as_is(item):
    return item


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
