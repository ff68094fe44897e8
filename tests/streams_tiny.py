"""Sharded token streams for the stream tests (`data.name=tests.streams_tiny:windows`): a torch
IterableDataset with `num_shards` and `iter_shard`, shards of different lengths, every window
distinct; and a stream that does not say how it is sharded."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import IterableDataset


class ShardedWindows(IterableDataset):
    def __init__(self, shards: list, seq_len: int):
        self.shards, self.seq_len, self.num_shards = shards, seq_len, len(shards)

    def windows_in(self, index: int) -> int:
        return (len(self.shards[index]) - 1) // self.seq_len

    def iter_shard(self, index: int, start: int):
        tokens, n = self.shards[index], self.seq_len
        for k in range(start, self.windows_in(index)):
            w = torch.from_numpy(tokens[k * n : (k + 1) * n + 1].astype(np.int64))
            yield w[:-1], w[1:]

    def __iter__(self):
        for i in range(self.num_shards):
            yield from self.iter_shard(i, 0)


class Unsharded(IterableDataset):
    def __init__(self, inner: ShardedWindows):
        self.inner = inner

    def __iter__(self):
        return iter(self.inner)


def shards(count: int, seq_len: int, vocab_size: int, seed: int, sizes=(20, 36)) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=int(rng.integers(*sizes)) * seq_len + 1).astype(np.uint16)
            for _ in range(count)]


def windows(seq_len: int = 16, vocab_size: int = 300, count: int = 8, seed: int = 0, sharded: bool = True,
            eval_stream: bool = False, **_):
    train = ShardedWindows(shards(count, seq_len, vocab_size, seed), seq_len)
    evaluation = ShardedWindows(shards(2, seq_len, vocab_size, seed + 1, sizes=(3, 5)), seq_len)
    if not eval_stream:
        evaluation = list(evaluation)
    meta = {"task": "lm", "vocab_size": vocab_size, "seq_len": seq_len}
    return (train if sharded else Unsharded(train)), evaluation, meta
