"""The `hf_datasets` data source: a Hugging Face `datasets` dataset from disk (a save_to_disk
directory, or local JSON/JSONL/CSV/Parquet files), tokenized once by `Dataset.map` into a
cache file that later runs, and the other ranks, load instead of tokenizing again.

mode=windows: the text is tokenized and packed into windows of seq_len + 1 tokens (the
documents of each map batch of 1,000 rows concatenated, `eos` between them, the remainder
dropped), samples (x, y) as the `tokens` source gives. mode=rows: one sample per row,
{"input_ids", "attention_mask"} cut to seq_len, batched by a padding collator that adds
"labels" (padding ignored). Arrow tables are memory-mapped, and samples are read by index:
the global-position sampler applies unchanged, and resume is exact on any world size.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import ConfigError
from ..corpus import file_sha256
from .shards import ListSamples, Shards, hf_rows

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
MAP_BATCH = 1000  # rows per map call: fixes where the packed windows fall, so it is part of the cache key
CACHE_VERSION = 1


def hf_dataset(path: str, tokenizer: str, seq_len: int = 256, mode: str = "windows", text_field: str = "text",
                split: str = "train", eval_split: str | None = None, eval_fraction: float = 0.01,
                eos: str | None = None, pad_token: str | None = None, cache_dir: str | None = None,
                streaming: bool = False, on_bad_row: str = "fail"):
    """data.path: a save_to_disk directory, or a file or directory of .json/.jsonl/.csv/.parquet
    files; data.tokenizer: a tokenizer.json; data.cache_dir (default PATH.cache next to the data):
    the tokenized cache and `datasets`' own."""
    if on_bad_row not in ("fail", "skip"):
        raise ConfigError("data.on_bad_row", f"must be fail or skip (got {on_bad_row!r})")
    if mode not in ("windows", "rows"):
        raise ConfigError("data.mode", f"must be windows or rows (got {mode!r})")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError("data.seq_len", f"must be a positive integer (got {seq_len!r})")
    if not Path(tokenizer).is_file():
        raise ConfigError("data.tokenizer", f"{tokenizer}: tokenizer file not found")
    cache = Path(cache_dir) if cache_dir else Path(str(Path(path).resolve()) + ".cache")
    if streaming:
        return _stream(path, tokenizer, seq_len, mode, text_field, eos, pad_token, eval_fraction)
    source = _load(path, split, cache, on_bad_row)
    eval_source = _load(path, eval_split, cache, on_bad_row) if eval_split else None
    if text_field not in source.column_names:
        raise ConfigError("data.text_field", f"{path} has no column '{text_field}' "
                                             f"(columns: {', '.join(source.column_names)})")
    tokenize = Tokenize(str(Path(tokenizer).resolve()), mode, seq_len, text_field, eos, path)
    train = _tokenized(source, tokenize, cache, {"files": _file_stats(path, cache), "split": split})
    if eval_source is not None:
        evaluation = _tokenized(eval_source, tokenize, cache, {"files": _file_stats(path, cache), "split": eval_split})
    else:
        n_eval = max(1, round(len(train) * eval_fraction)) if eval_fraction > 0 else 0
        if len(train) - n_eval < 1:
            raise ConfigError("data.path", f"{path} gives {len(train)} samples of {seq_len} tokens: too few")
        held_out = range(len(train) - n_eval, len(train)) if n_eval else []  # datasets refuses an empty range
        train, evaluation = train.select(range(len(train) - n_eval)), train.select(held_out)
    meta = {"task": "lm", "vocab_size": tokenize.vocab_size, "seq_len": seq_len}
    if mode == "rows":
        meta["collate"] = _padding_collator(tokenize, pad_token or eos)
    return Samples(train, mode), Samples(evaluation, mode), meta


class Samples(Dataset):
    """Rows of a tokenized Arrow table as training samples."""

    def __init__(self, table, mode: str):
        self.table, self.mode = table.with_format("numpy"), mode

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int):
        row = self.table[int(index)]
        if self.mode == "windows":
            window = torch.from_numpy(row["window"].astype(np.int64))
            return window[:-1], window[1:]
        return {k: torch.from_numpy(row[k].astype(np.int64)) for k in ("input_ids", "attention_mask")}


class Tokenize:
    """The map function (picklable: `datasets` may run it in worker processes)."""

    def __init__(self, tokenizer_path: str, mode: str, seq_len: int, text_field: str, eos: str | None, source: str):
        from tokenizers import Tokenizer

        self.tokenizer_path, self.mode, self.seq_len, self.text_field, self.source = (
            tokenizer_path, mode, seq_len, text_field, source)
        tokenizer = Tokenizer.from_file(tokenizer_path)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = tokenizer.token_to_id(eos) if eos else None
        if eos and self.eos_id is None:
            raise ConfigError("data.eos", f"the tokenizer {tokenizer_path} has no token {eos!r}")
        self.key = {"tokenizer_sha256": file_sha256(tokenizer_path), "mode": mode, "seq_len": seq_len,
                    "text_field": text_field, "eos": eos, "map_batch": MAP_BATCH, "version": CACHE_VERSION}
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, batch: dict) -> dict:
        from tokenizers import Tokenizer

        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(self.tokenizer_path)
        texts = batch[self.text_field]
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(f"{self.source}: a row's '{self.text_field}' is not a string ({texts[bad]!r})")
        ids = [e.ids for e in self._tokenizer.encode_batch(texts)]
        if self.mode == "rows":
            ids = [i[: self.seq_len] for i in ids]
            return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        tail = [self.eos_id] if self.eos_id is not None else []
        stream = [t for i in ids for t in i + tail]
        n = max(0, (len(stream) - 1) // self.seq_len)
        return {"window": [stream[k * self.seq_len : (k + 1) * self.seq_len + 1] for k in range(n)]}


def _load(path: str, split: str, cache: Path, on_bad_row: str = "fail"):
    import datasets

    p = Path(path)
    if not p.exists():
        raise ConfigError("data.path", f"{path}: no such file or directory")
    if p.is_dir() and any((p / m).is_file() for m in SAVED_MARKERS):
        loaded = datasets.load_from_disk(str(p))
    else:
        kind, files = _data_files(path)
        try:
            loaded = datasets.load_dataset(kind, data_files=files, cache_dir=str(cache / "datasets"))
        except datasets.exceptions.DatasetGenerationError:
            if kind != "json":
                raise
            # datasets' JSON reader stops at a bad line without naming it: find it, then stop,
            # or read the good rows from a cleaned copy
            loaded = datasets.load_dataset(kind, data_files=_good_json_rows(files, cache, on_bad_row),
                                           cache_dir=str(cache / "datasets"))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError("data.split", f"{path} has no split '{split}' (splits: {', '.join(loaded)})")
        return loaded[split]
    return loaded


def _good_json_rows(files: list[str], cache: Path, on_bad_row: str) -> list[str]:
    import logging

    out, reported = [], 0
    for name in files:
        good, bad = [], []
        with open(name, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    if line.strip():
                        good.append(json.dumps(json.loads(line)))
                except json.JSONDecodeError as e:
                    bad.append((number, e.msg))
        for number, problem in bad:
            if on_bad_row == "fail":
                raise ConfigError("data.on_bad_row", f"{name}:{number}: not a JSON row ({problem}); "
                                                     "data.on_bad_row=skip skips such rows")
            if reported < 50:
                logging.getLogger("distrain").warning("data: %s:%d: not a JSON row (%s); skipped", name, number,
                                                      problem)
            reported += 1
        clean = cache / "clean" / (hashlib.sha256(name.encode()).hexdigest()[:16] + ".jsonl")
        clean.parent.mkdir(parents=True, exist_ok=True)
        clean.write_text("".join(g + "\n" for g in good), encoding="utf-8")
        out.append(str(clean))
    return out


def _data_files(path: str) -> tuple[str, list[str]]:
    p = Path(path)
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.suffix.lower() in FILE_BUILDERS)
    kinds = {FILE_BUILDERS[f.suffix.lower()] for f in files}
    if len(kinds) != 1:
        raise ConfigError("data.path", f"{path}: give a save_to_disk directory, or files of one kind "
                                       f"({', '.join(FILE_BUILDERS)}); found {len(files)} file(s) of "
                                       f"{len(kinds)} kinds")
    return kinds.pop(), [str(f) for f in files]


def _stream(path, tokenizer, seq_len, mode, text_field, eos, pad_token, eval_fraction):
    """streaming=true: the files read as they are used, one shard per file, tokenized on the fly
    (windows packed within each map batch of a file); the last file is the eval set when
    eval_fraction > 0."""
    import datasets


    p = Path(path)
    if not p.exists():
        raise ConfigError("data.path", f"{path}: no such file or directory")
    if p.is_dir() and any((p / m).is_file() for m in SAVED_MARKERS):
        raise ConfigError("data.streaming", f"{path} is a save_to_disk directory, already memory-mapped: "
                                            "streaming reads JSON/CSV/Parquet files")
    kind, files = _data_files(path)
    held_out = 1 if eval_fraction > 0 else 0
    if len(files) - held_out < 1:
        raise ConfigError("data.path", f"{path}: streaming holds the last file out for evaluation and needs "
                                       f"another to train on (found {len(files)})")
    tokenize = Tokenize(str(Path(tokenizer).resolve()), mode, seq_len, text_field, eos, path)
    load = lambda names: datasets.load_dataset(kind, data_files=names, streaming=True, split="train")  # noqa: E731
    train = TokenStream(load(files[: len(files) - held_out]), tokenize)
    evaluation = ListSamples(Shards(TokenStream(load(files[-1:]), tokenize)).all_samples()) if held_out else []
    meta = {"task": "lm", "vocab_size": tokenize.vocab_size, "seq_len": seq_len}
    if mode == "rows":
        meta["collate"] = _padding_collator(tokenize, pad_token or eos)
    return train, evaluation, meta


class TokenStream(torch.utils.data.IterableDataset):
    """A streaming `datasets` source as distrain's shards: one per file, each tokenized as it is read."""

    def __init__(self, source, tokenize: Tokenize):
        self.source, self.tokenize, self.num_shards = source, tokenize, source.num_shards

    def iter_shard(self, index: int, start: int):
        part = self.source.shard(num_shards=self.num_shards, index=index, contiguous=True)
        rows = part.map(self.tokenize, batched=True, batch_size=MAP_BATCH, remove_columns=part.column_names)
        for row in hf_rows(rows.skip(start) if start else rows):
            if self.tokenize.mode == "windows":
                window = torch.tensor(row["window"], dtype=torch.int64)
                yield window[:-1], window[1:]
            else:
                yield {k: torch.tensor(row[k], dtype=torch.int64) for k in ("input_ids", "attention_mask")}

    def __iter__(self):
        for i in range(self.num_shards):
            yield from self.iter_shard(i, 0)


def _file_stats(path: str, cache: Path) -> list:
    p, cache = Path(path).resolve(), cache.resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file() and cache not in f.parents) if p.is_dir() else [p]
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def _tokenized(source, tokenize: Tokenize, cache: Path, data_key: dict):
    """`source` mapped through `tokenize` into a cache file named by both (the data by its
    files' paths, sizes and times): the first rank to get there writes it, the others (and
    every later run) read it."""
    from filelock import FileLock

    key = json.dumps({**data_key, **tokenize.key}, sort_keys=True)
    name = hashlib.sha256(key.encode()).hexdigest()[:20]
    cache.mkdir(parents=True, exist_ok=True)
    cache_file = cache / f"tokenized-{name}.arrow"
    with FileLock(str(cache_file) + ".lock"):
        try:
            return source.map(tokenize, batched=True, batch_size=MAP_BATCH, remove_columns=source.column_names,
                              cache_file_name=str(cache_file), new_fingerprint=name, load_from_cache_file=True,
                              desc="tokenizing")
        except ValueError as e:
            raise ConfigError("data.text_field", str(e).splitlines()[0])


def _padding_collator(tokenize: Tokenize, pad_token: str | None):
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    if pad_token is None:
        raise ConfigError("data.pad_token", "mode=rows pads batches: name the tokenizer's padding token "
                                            "(or give data.eos)")
    wrapped = PreTrainedTokenizerFast(tokenizer_file=tokenize.tokenizer_path, pad_token=pad_token)
    if wrapped.pad_token_id is None or wrapped.convert_tokens_to_ids(pad_token) == wrapped.unk_token_id:
        raise ConfigError("data.pad_token", f"the tokenizer has no token {pad_token!r}")
    return DataCollatorForLanguageModeling(wrapped, mlm=False, return_tensors="pt")
