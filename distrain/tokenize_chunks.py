"""Reading source files in independent chunks and tokenizing them, in `distrain prepare`'s
worker processes. A chunk ends on a document boundary, so the chunks' token ids put back
in order are exactly the ids of the whole files.

Documents: in a text file, the pieces between blank lines (two or more newlines); in
JSONL, one per line (the `text_field` of a JSON object); in Parquet, one per row of the
`text_field` column.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
           ".parquet": "parquet"}
_BLANK_LINES = re.compile(r"\n{2,}")


class SourceError(ValueError):
    """A source file that cannot be read as its kind; names the file and the place."""


@dataclass(frozen=True)
class Chunk:
    source: int  # index into the source list
    path: str
    kind: str  # text | jsonl | parquet
    start: int  # byte offset (text, jsonl) or row group (parquet)
    stop: int
    weight: int  # bytes, for the progress bar


@dataclass
class Tokenized:
    tokens: np.ndarray
    lengths: np.ndarray  # tokens per document
    rows: int  # lines (jsonl) or rows (parquet) read, for numbering the next chunk's rows
    bad: list = field(default_factory=list)  # (row number within the chunk, 1-based; problem)


def plan_chunks(source: int, path: Path, kind: str, chunk_bytes: int, text_field: str) -> list[Chunk]:
    if kind == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except pyarrow.ArrowException as e:
            raise SourceError(f"{path}: not a Parquet file ({e})")
        if text_field not in meta.schema.names:
            raise SourceError(f"{path}: no column '{text_field}' (columns: {', '.join(meta.schema.names)}); "
                              "choose it with --text-field")
        size = path.stat().st_size
        return [Chunk(source, str(path), kind, g, g + 1, size * meta.row_group(g).num_rows // max(1, meta.num_rows))
                for g in range(meta.num_row_groups)]
    chunks, start, size = [], 0, path.stat().st_size
    with open(path, "rb") as f:
        while start < size:
            stop = _boundary_after(f, start + chunk_bytes, size, blank_line=kind == "text")
            chunks.append(Chunk(source, str(path), kind, start, stop, stop - start))
            start = stop
    return chunks


def _boundary_after(f, position: int, size: int, blank_line: bool) -> int:
    """The first line start at or after `position` (for text: the first one after a run of
    newlines with at least one empty line), or the end of the file."""
    if position >= size:
        return size
    f.seek(position - 1)
    f.readline()  # to the end of the line `position` falls in
    if not blank_line:
        return f.tell()
    in_run = False
    while True:
        start, line = f.tell(), f.readline()
        if not line:
            return size
        if line == b"\n":
            in_run = True
        elif in_run:
            return start


class ChunkTokenizer:
    """One per worker process: the tokenizer, loaded once, and what makes a document."""

    def __init__(self, tokenizer_path: str, dtype: str, eos_id: int | None, text_field: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.dtype, self.eos_id, self.text_field = np.dtype(dtype), eos_id, text_field
        self._encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)

    def __call__(self, chunk: Chunk) -> Tokenized:
        docs, rows, bad = getattr(self, f"_read_{chunk.kind}")(chunk)
        ids = [e.ids for e in self._encode(docs)] if docs else []
        if self.eos_id is not None:
            for d in ids:
                d.append(self.eos_id)
        lengths = np.fromiter((len(d) for d in ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return Tokenized(tokens, lengths, rows, bad)

    def _read_bytes(self, chunk: Chunk) -> bytes:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.start)
            return f.read(chunk.stop - chunk.start)

    def _read_text(self, chunk: Chunk):
        data = self._read_bytes(chunk)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SourceError(f"{chunk.path}: not valid UTF-8 at byte {chunk.start + e.start}") from None
        return [d for d in _BLANK_LINES.split(text) if d.strip()], 0, []

    def _read_jsonl(self, chunk: Chunk):
        lines = self._read_bytes(chunk).split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        docs, bad = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                bad.append((number, f"not valid JSON ({e})"))
                continue
            problem = self._text_problem(row.get(self.text_field) if isinstance(row, dict) else None, row)
            if problem:
                bad.append((number, problem))
            else:
                docs.append(row[self.text_field])
        return docs, len(lines), bad

    def _read_parquet(self, chunk: Chunk):
        import pyarrow.parquet as pq

        table = pq.ParquetFile(chunk.path).read_row_group(chunk.start, columns=[self.text_field])
        docs, bad = [], []
        for number, value in enumerate(table.column(0).to_pylist(), 1):
            problem = self._text_problem(value, {self.text_field: value})
            if problem:
                bad.append((number, problem))
            else:
                docs.append(value)
        return docs, table.num_rows, bad

    def _text_problem(self, value, row) -> str | None:
        if not isinstance(row, dict):
            return f"not a JSON object (a {type(row).__name__})"
        if self.text_field not in row:
            return f"has no field '{self.text_field}'"
        if not isinstance(value, str):
            return f"field '{self.text_field}' is not a string (a {type(value).__name__})"
        return None


_worker: ChunkTokenizer | None = None


def init_worker(*args) -> None:
    """A pool process: the processes are the parallelism, so the tokenizer's own thread pool
    is turned off (its only switch is this variable, read by the library when it encodes)."""
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = ChunkTokenizer(*args)


def tokenize_in_worker(chunk: Chunk) -> Tokenized:
    return _worker(chunk)
