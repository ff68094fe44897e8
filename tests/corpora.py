"""Generated corpora for the token data tests: seeded text, JSONL and Parquet files of made-up
words, and a tiny BPE tokenizer trained on them with `tokenizers`."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "du", "sha", "qui", "ox", "el", "an", "ber"]


def documents(n: int, seed: int, words_per_doc: tuple[int, int] = (20, 400)) -> list[str]:
    """n paragraphs of made-up words with a Zipf-like frequency, some punctuation and unicode."""
    rng = np.random.default_rng(seed)
    lexicon = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(3000)] + ["é", "ß", "日本"]
    weights = 1.0 / np.arange(1, len(lexicon) + 1)
    weights /= weights.sum()
    docs = []
    for _ in range(n):
        words = rng.choice(lexicon, size=rng.integers(*words_per_doc), p=weights)
        sentences = np.array_split(words, max(1, len(words) // 12))
        docs.append(" ".join(" ".join(s).capitalize() + rng.choice([".", "!", "?", ","]) for s in sentences))
    return docs


def write_text(path: Path, docs: list[str]) -> Path:
    # blank lines between documents, sometimes more than one, and single newlines inside
    rng = np.random.default_rng(len(docs))
    parts = [d.replace(". ", ".\n", 1) + "\n" * int(rng.integers(2, 4)) for d in docs]
    path.write_text("".join(parts), encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}, ensure_ascii=i % 2 == 0) + "\n")
    return path


def write_parquet(path: Path, docs: list[str], row_group_size: int = 200) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=row_group_size)
    return path


def train_tokenizer(path: Path, docs: list[str], vocab_size: int = 400) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer=trainer)
    tokenizer.save(str(path))
    return path


def text_documents(path: Path) -> list[str]:
    """The documents `distrain prepare` reads from a text file: the pieces between blank lines."""
    return [d for d in re.split(r"\n{2,}", Path(path).read_text(encoding="utf-8")) if d.strip()]


def expected_ids(tokenizer_path: Path, docs: list[str], eos: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and document offsets by the tokenizer applied directly, one document at a time."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tail = [tokenizer.token_to_id(eos)] if eos else []
    ids = [tokenizer.encode(d).ids + tail for d in docs]
    offsets = np.cumsum([0] + [len(i) for i in ids])
    return np.array([t for i in ids for t in i], dtype=np.int64), offsets
