"""Synthetic token rows for bench/hf_step.py (`data.name=bench.hf_data:lm_tokens`): fixed
length, no padding, labels equal to the inputs, so every label counts and a plain
`model(**batch).loss` mean covers the same tokens as distrain's token-level loss."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB, SEQ_LEN = 512, 64


class TokenRows(Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def token_rows(n: int, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """Its own generator: building the data leaves the global RNG, and so the model's init, alone."""
    return torch.randint(0, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def lm_tokens(n_train: int = 2048, n_eval: int = 32, seq_len: int = SEQ_LEN, seed: int = 0):
    rows = token_rows(n_train + n_eval, seq_len, seed)
    meta = {"task": "lm", "vocab_size": VOCAB, "seq_len": seq_len}
    return TokenRows(rows[:n_train]), TokenRows(rows[n_train:]), meta
