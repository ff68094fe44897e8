"""Data builders return (train, eval, meta). Samples are dicts of tensors, the Hugging Face
shape; meta["collate"] turns a list of samples into a batch when they differ in length."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class TokenWindows(Dataset):
    """Non-overlapping windows of a flat token file, read through a memory map (the file is
    never loaded whole). Labels are the inputs themselves: causal LMs shift them in the loss."""

    def __init__(self, path: str, seq_len: int, dtype: str, first: int, count: int):
        self.path, self.seq_len, self.dtype, self.first, self.count = path, seq_len, dtype, first, count
        self.tokens = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        if self.tokens is None:  # opened in the process that reads, so worker processes map it themselves
            self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        start = (self.first + i) * self.seq_len
        ids = torch.from_numpy(self.tokens[start : start + self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}

    def __getstate__(self):  # a memory map does not pickle; each worker maps the file again
        return {**self.__dict__, "tokens": None}


def token_file(path: str, seq_len: int = 64, eval_fraction: float = 0.1, dtype: str = "uint16"):
    tokens = np.memmap(path, dtype=dtype, mode="r")
    windows = len(tokens) // seq_len
    n_eval = max(1, int(windows * eval_fraction))
    meta = {"task": "lm", "vocab_size": int(tokens.max()) + 1, "seq_len": seq_len}
    return (TokenWindows(path, seq_len, dtype, 0, windows - n_eval),
            TokenWindows(path, seq_len, dtype, windows - n_eval, n_eval), meta)


def write_byte_tokens(text_path: str, out_path: str) -> int:
    """The simplest tokenizer: one token per UTF-8 byte (vocabulary 256), as uint16."""
    data = np.frombuffer(Path(text_path).read_bytes(), dtype=np.uint8).astype(np.uint16)
    data.tofile(out_path)
    return len(data)


class PadCollator:
    """Pads `input_ids` to the longest sample of the batch, with an attention mask saying which
    positions are real. A class, not a closure, so DataLoader worker processes can receive it."""

    def __init__(self, pad_id: int = 0):
        self.pad_id = pad_id

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, s in enumerate(samples):
            ids[row, : len(s["input_ids"])] = s["input_ids"]
            mask[row, : len(s["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([s["labels"] for s in samples])}


class Sequences(Dataset):
    def __init__(self, samples: list[dict]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def variable_length_classes(n_train: int = 512, n_eval: int = 128, vocab_size: int = 64, num_classes: int = 3,
                            min_len: int = 4, max_len: int = 24, seed: int = 0):
    """Sequences of random lengths; the class is which of the tokens 1..num_classes occurs most."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n_train + n_eval):
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        ids = torch.randint(1, vocab_size, (length,), generator=g)
        votes = torch.stack([(ids == c + 1).sum() for c in range(num_classes)])
        samples.append({"input_ids": ids, "labels": votes.argmax()})
    meta = {"task": "classification", "num_classes": num_classes, "vocab_size": vocab_size,
            "collate": PadCollator(pad_id=0)}
    return Sequences(samples[:n_train]), Sequences(samples[n_train:]), meta


if __name__ == "__main__":  # python -m examples.userpkg.data TEXT_FILE OUT.bin
    print(f"wrote {write_byte_tokens(sys.argv[1], sys.argv[2])} tokens to {sys.argv[2]}")
