"""The `tokens` data source: a corpus made by `distrain prepare`, memory-mapped.

Training samples are fixed windows of seq_len + 1 tokens, packed across documents: window
i is tokens [i * seq_len, (i + 1) * seq_len + 1), giving x = its first seq_len tokens and
y = its last seq_len. The last windows are held out for evaluation. A window is read from
the mapped file when it is asked for, and the file is opened in each process on first use
(never pickled into DataLoader workers), and the pages around a window are unmapped once
it is copied out, so a corpus of any size costs a rank no resident memory beyond its batches.

With doc_mask, a target that starts a new document (predicting it from the previous
document's tokens) is set to IGNORE_INDEX, so no loss crosses a document boundary.
"""
from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from ..corpus import DOCUMENTS, MANIFEST, TOKENS, CorpusError, check_files, check_tokenizer, read_manifest
from .batch import IGNORE_INDEX

# Mapped pages are released after each read in aligned spans this large: a fault maps a
# whole cached folio, up to 2 MiB on x86-64, not only the pages a window needs
RELEASE_SPAN = 2 << 20


def prepared_corpus(path: str, seq_len: int = 256, eval_fraction: float = 0.01, doc_mask: bool = False,
           tokenizer: str | None = None):
    """data.path: the `distrain prepare` output directory; data.tokenizer: the tokenizer.json
    in use, checked against the one the corpus was made with (default: the file the manifest names)."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError("data.seq_len", f"must be a positive integer (got {seq_len!r})")
    if not 0 <= eval_fraction < 1:
        raise ConfigError("data.eval_fraction", f"must be in [0, 1) (got {eval_fraction!r})")
    try:
        manifest = read_manifest(path)
        check_files(path, manifest)
    except CorpusError as e:
        raise ConfigError("data.path", str(e))
    try:
        check_tokenizer(manifest, tokenizer, Path(path) / MANIFEST)
    except CorpusError as e:
        raise ConfigError("data.tokenizer", str(e))
    windows = (manifest["tokens"] - 1) // seq_len
    n_eval = round(windows * eval_fraction) if eval_fraction else 0
    n_eval = max(n_eval, 1 if eval_fraction else 0)
    if windows - n_eval < 1:
        raise ConfigError("data.seq_len", f"{path} holds {manifest['tokens']} tokens: too few for one training "
                                          f"window of {seq_len + 1} tokens besides {n_eval} for evaluation")
    corpus = (Path(path), manifest["dtype"], manifest["tokens"], seq_len, doc_mask)
    train = TokenWindows(*corpus, first=0, count=windows - n_eval)
    evaluation = TokenWindows(*corpus, first=windows - n_eval, count=n_eval)
    return train, evaluation, {"task": "lm", "vocab_size": manifest["vocab_size"], "seq_len": seq_len}


class TokenWindows(Dataset):
    """Windows first .. first + count - 1 of the corpus; map-style, returns (x, y) int64 tensors."""

    def __init__(self, directory: Path, dtype: str, n_tokens: int, seq_len: int, doc_mask: bool, first: int,
                 count: int):
        self.directory, self.dtype, self.n_tokens, self.seq_len = directory, np.dtype(dtype), n_tokens, seq_len
        self.doc_mask, self.first, self.count = doc_mask, first, count
        self._map = self._tokens = self._offsets = None

    def __len__(self) -> int:
        return self.count

    def window_id(self, index: int) -> int:
        """The window's number in the whole corpus (train and eval windows never share one)."""
        return self.first + index

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.count:
            raise IndexError(f"window {index} out of range for {self.count} windows")
        if self._tokens is None:
            self._open()
        start = (self.first + index) * self.seq_len
        window = torch.from_numpy(self._tokens[start : start + self.seq_len + 1].astype(np.int64))
        x, y = window[:-1], window[1:]
        if self.doc_mask:
            y = y.clone()
            # targets at positions p hold tokens start + 1 + p; those that open a document are masked
            lo, hi = np.searchsorted(self._offsets, [start + 1, start + self.seq_len + 1])
            y[torch.from_numpy(self._offsets[lo:hi] - (start + 1))] = IGNORE_INDEX
        self._release(start)
        return x, y

    def _open(self) -> None:
        # np.memmap's own mapping, made here so that its pages can be advised and released
        with open(self.directory / TOKENS, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):
            self._map.madvise(mmap.MADV_RANDOM)  # windows are read in a shuffled order: no read-ahead
        self._tokens = np.frombuffer(self._map, dtype=self.dtype, count=self.n_tokens)
        if self.doc_mask:
            self._offsets = np.load(self.directory / DOCUMENTS, mmap_mode="r")

    def _release(self, start: int) -> None:
        """Unmap the pages around the window just read (the kernel keeps them cached). Without
        this every page a rank touched would stay in its resident set: a few hundred random
        windows map a whole 100 MB file (measured in bench/data.py), an epoch any corpus."""
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        width = self.dtype.itemsize
        lo = start * width // RELEASE_SPAN * RELEASE_SPAN
        hi = min(len(self._map), -(-(start + self.seq_len + 1) * width // RELEASE_SPAN) * RELEASE_SPAN)
        self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def __getstate__(self) -> dict:
        # DataLoader workers (and spawned processes) open the file themselves
        state = dict(self.__dict__)
        state["_map"] = state["_tokens"] = state["_offsets"] = None
        return state
