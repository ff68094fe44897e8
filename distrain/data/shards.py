"""What distrain needs to know of a stream: its shards (`num_shards` and `iter_shard(index,
start)`, or a Hugging Face IterableDataset's `shard` + `skip`), and the readers that cut a
rank's shards into micro-batches, each tagged with where it ends in every shard it touched."""
from __future__ import annotations

import itertools

import torch
from torch.utils.data import IterableDataset, get_worker_info


def is_stream(dataset) -> bool:
    return isinstance(dataset, IterableDataset) or _is_hf_stream(dataset)


def _is_hf_stream(dataset) -> bool:
    return type(dataset).__module__.startswith("datasets.") and type(dataset).__name__ == "IterableDataset"


class Shards:
    """How a stream is split: `count` shards, or None for a stream that does not say."""

    def __init__(self, dataset):
        self.dataset = dataset
        n = getattr(dataset, "num_shards", None)
        known = hasattr(dataset, "iter_shard") or _is_hf_stream(dataset)
        self.count = n if known and isinstance(n, int) and n > 0 else None

    def open(self, shard: int, start: int):
        d = self.dataset
        if self.count is None:
            return itertools.islice(iter(d), start, None)
        if hasattr(d, "iter_shard"):
            return iter(d.iter_shard(shard, start))
        part = d.shard(num_shards=self.count, index=shard, contiguous=True)
        return hf_rows((part.skip(start) if start else part).with_format("torch"))

    def all_samples(self) -> list:
        if self.count is None:
            return list(self.open(0, 0))
        return [s for i in range(self.count) for s in self.open(i, 0)]


def hf_rows(dataset, batch_size: int = 64):
    """The rows of a Hugging Face IterableDataset, read through `iter`: its `__iter__` in a
    DataLoader worker would keep only that worker's share of the shards, and ours are dealt already."""
    for batch in dataset.iter(batch_size=batch_size):
        columns = list(batch.values())
        for i in range(len(columns[0]) if columns else 0):
            yield {k: v[i] for k, v in batch.items()}


class ListSamples(torch.utils.data.Dataset):
    def __init__(self, samples: list):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.samples[i]


def in_memory(dataset):
    """An eval stream read once into a list (eval sets are small): evaluation is then exact
    on any world size, as for any map-style set."""
    return ListSamples(Shards(dataset).all_samples()) if is_stream(dataset) else dataset


class RankReaders(IterableDataset):
    """One rank's readers; in a DataLoader, worker w is reader (w + rotation) % workers, so that a
    resumed round-robin starts with the worker the interrupted one would have asked next."""

    def __init__(self, shards: Shards, plan: dict, first: int, workers: int, rotation: int, micro: int, collate):
        self.shards, self.plan, self.first, self.workers = shards, plan, first, workers
        self.rotation, self.micro, self.collate = rotation, micro, collate

    def __iter__(self):
        info = get_worker_info()
        if info is None:  # in the rank's own process: its one reader
            yield from self._batches(self.first)
        else:
            yield from self._batches(self.first + (info.id + self.rotation) % self.workers)

    def _batches(self, reader: int):
        samples, ends = [], {}
        for shard, start in self.plan[reader]:
            for offset, (sample, last) in enumerate(_with_last(self.shards.open(shard, start)), start + 1):
                samples.append(sample)
                ends[shard] = (offset, last)
                if len(samples) == self.micro:
                    yield self.collate(samples), reader, ends
                    samples, ends = [], {}
        if samples:
            yield self.collate(samples), reader, ends


def _with_last(iterator):
    """(sample, whether it is the last one) pairs: a finished shard is known with its last sample."""
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for sample in iterator:
        yield previous, False
        previous = sample
    yield previous, True
