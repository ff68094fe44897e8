"""`distrain prepare --tokenizer tokenizer.json --out DIR SOURCE...`: tokenize text, JSONL or
Parquet files once, in parallel, into a memory-mapped token corpus (see distrain/corpus.py)
that the `tokens` data source trains from.

Rerunning with the same inputs (tokenizer, files by path, size and mtime, options) does
nothing. The files are written under DIR/.partial and moved into place, the manifest last:
an interrupted run leaves no manifest, so nothing takes its output for a finished corpus,
and the next run starts over.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .corpus import (DOCUMENTS, FORMAT, MANIFEST, TOKENS, CorpusError, check_files, file_sha256, read_manifest,
                     token_dtype)
from .tokenize_chunks import FORMATS, ChunkTokenizer, SourceError, init_worker, plan_chunks, tokenize_in_worker

PARTIAL = ".partial"
MAX_REPORTED_ROWS = 50  # skipped rows named one by one; beyond this only counted


class PrepareError(Exception):
    """Bad input to `distrain prepare` (exit 2, one line)."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="distrain prepare", description="Tokenize files into a token corpus.")
    p.add_argument("sources", nargs="+", help="text (.txt, .md), JSONL (.jsonl, .json) or Parquet files, or "
                                              "directories of them")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizers tokenizer.json")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--eos", default=None, help="a token appended after every document, e.g. '<|endoftext|>'")
    p.add_argument("--on-bad-row", choices=["fail", "skip"], default="fail",
                   help="a JSONL line or Parquet row without usable text: stop (exit 2), or warn and skip it")
    p.add_argument("--workers", type=int, default=_cpus(), help="tokenizer processes (default: one per CPU)")
    p.add_argument("--chunk-mb", type=float, default=4.0, help="work unit per process, in MB of source")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return prepare(args)
    except (PrepareError, CorpusError, SourceError) as e:
        print(f"distrain prepare: error: {e}", file=sys.stderr)
        return 2


def prepare(args) -> int:
    out = Path(args.out)
    tokenizer_path = Path(args.tokenizer).resolve()
    tokenizer = _load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eos_id = _eos_id(tokenizer, args.eos)
    sources = _find_sources(args.sources)
    if args.workers < 1 or args.chunk_mb <= 0:
        raise PrepareError("--workers must be >= 1 and --chunk-mb > 0")
    inputs = {"format": FORMAT, "tokenizer_sha256": file_sha256(tokenizer_path), "eos": args.eos,
              "text_field": args.text_field, "on_bad_row": args.on_bad_row,
              "sources": [{"path": str(p), "size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                          for p, _ in sources]}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".prepare.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a second prepare into the same directory waits, then finds it done
            print(f"distrain prepare: waiting for another prepare into {out}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_locked(args, out, tokenizer_path, vocab_size, eos_id, sources, inputs)


def _prepare_locked(args, out: Path, tokenizer_path: Path, vocab_size: int, eos_id, sources, inputs) -> int:
    if _up_to_date(out, inputs):
        print(f"distrain prepare: {out} is up to date")
        return 0
    dtype = token_dtype(vocab_size)
    chunks = [c for i, (p, kind) in enumerate(sources)
              for c in plan_chunks(i, p, kind, max(1, int(args.chunk_mb * 2**20)), args.text_field)]
    partial = out / PARTIAL
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted run left
    partial.mkdir(parents=True)
    worker_args = (str(tokenizer_path), dtype, eos_id, args.text_field)
    try:
        stats = _tokenize_all(chunks, sources, partial / TOKENS, args, worker_args)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a finished corpus already there stays as it was
        raise
    offsets = np.zeros(stats["documents"] + 1, dtype=np.int64)
    np.cumsum(np.concatenate(stats.pop("lengths")), out=offsets[1:])
    np.save(partial / DOCUMENTS, offsets)
    manifest = {"format": FORMAT, "dtype": dtype, "tokens": int(offsets[-1]), "documents": stats["documents"],
                "vocab_size": vocab_size, "eos_id": eos_id, "text_field": args.text_field,
                "tokenizer": {"path": str(tokenizer_path), "sha256": inputs["tokenizer_sha256"]},
                "sources": [{**s, "format": kind, **counts}
                            for s, (_, kind), counts in zip(inputs["sources"], sources, stats["per_source"])],
                "inputs": inputs}
    _commit(out, partial, manifest)
    print(f"distrain prepare: {manifest['tokens']:,} tokens ({dtype}) in {manifest['documents']:,} documents "
          f"from {len(sources)} file(s) -> {out}")
    return 0


def _tokenize_all(chunks, sources, tokens_path: Path, args, worker_args) -> dict:
    per_source = [{"documents": 0, "tokens": 0, "skipped_rows": 0} for _ in sources]
    rows_before = [0] * len(sources)  # rows of a source in the chunks already written: numbers bad rows
    lengths, documents, reported = [], 0, 0
    progress = _progress_bar(sum(c.weight for c in chunks), args.progress)
    with open(tokens_path, "wb") as f, _chunk_results(chunks, args.workers, worker_args) as results:
        for chunk, result in zip(chunks, results):
            for number, problem in result.bad:
                unit = "line" if chunk.kind == "jsonl" else "row"
                where = f"{chunk.path}:{unit} {rows_before[chunk.source] + number}"
                if args.on_bad_row == "fail":
                    raise PrepareError(f"{where}: {problem} (--on-bad-row=skip skips such rows)")
                if reported < MAX_REPORTED_ROWS:
                    print(f"distrain prepare: warning: {where}: {problem}; skipped", file=sys.stderr)
                reported += 1
            rows_before[chunk.source] += result.rows
            f.write(result.tokens.tobytes())
            lengths.append(result.lengths)
            documents += len(result.lengths)
            counts = per_source[chunk.source]
            counts["documents"] += len(result.lengths)
            counts["tokens"] += len(result.tokens)
            counts["skipped_rows"] += len(result.bad)
            progress.update(chunk.weight)
        f.flush()
        os.fsync(f.fileno())
    progress.close()
    if reported > MAX_REPORTED_ROWS:
        print(f"distrain prepare: warning: {reported} rows skipped in all ({reported - MAX_REPORTED_ROWS} "
              "more than listed)", file=sys.stderr)
    return {"documents": documents, "lengths": lengths or [np.zeros(0, np.int64)], "per_source": per_source}


class _chunk_results:
    """The chunks' results in order: in this process for one worker, else from a pool of
    spawned processes (tokenizers' own thread pool does not survive a fork)."""

    def __init__(self, chunks, workers: int, worker_args):
        self.chunks, self.worker_args, self.pool = chunks, worker_args, None
        self.workers = min(workers, max(1, len(chunks)))

    def __enter__(self):
        if self.workers == 1:
            tokenize = ChunkTokenizer(*self.worker_args)
            return map(tokenize, self.chunks)
        import multiprocessing

        self.pool = multiprocessing.get_context("spawn").Pool(self.workers, init_worker, self.worker_args)
        return self.pool.imap(tokenize_in_worker, self.chunks)

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _commit(out: Path, partial: Path, manifest: dict) -> None:
    """Old manifest out first, data files in, new manifest last: at no moment does a manifest
    sit beside data it does not describe."""
    (out / MANIFEST).unlink(missing_ok=True)
    for name in (TOKENS, DOCUMENTS):
        os.replace(partial / name, out / name)
    staged = partial / MANIFEST
    staged.write_text(json.dumps(manifest, indent=1) + "\n")
    with open(staged, "rb") as f:
        os.fsync(f.fileno())
    os.replace(staged, out / MANIFEST)
    partial.rmdir()
    directory = os.open(out, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _up_to_date(out: Path, inputs: dict) -> bool:
    if not (out / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(out)
        check_files(out, manifest)
    except (CorpusError, KeyError, TypeError):
        return False
    return manifest.get("inputs") == inputs


def _load_tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise PrepareError("distrain prepare needs the `tokenizers` package: pip install 'distrain[hf]'")
    if not path.is_file():
        raise PrepareError(f"--tokenizer: {path} not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a malformed file
        raise PrepareError(f"--tokenizer: {path} is not a tokenizers tokenizer.json ({e})")


def _eos_id(tokenizer, eos: str | None) -> int | None:
    if eos is None:
        return None
    token_id = tokenizer.token_to_id(eos)
    if token_id is None:
        raise PrepareError(f"--eos: the tokenizer has no token {eos!r}")
    return token_id


def _find_sources(names: list[str]) -> list[tuple[Path, str]]:
    found = []
    for name in names:
        path = Path(name).resolve()
        if path.is_dir():
            found += [(p, FORMATS[p.suffix.lower()]) for p in sorted(path.rglob("*"))
                      if p.is_file() and p.suffix.lower() in FORMATS]
        elif not path.is_file():
            raise PrepareError(f"{name}: no such file or directory")
        elif path.suffix.lower() not in FORMATS:
            raise PrepareError(f"{name}: unknown kind of file (give {', '.join(FORMATS)})")
        else:
            found.append((path, FORMATS[path.suffix.lower()]))
    if not found:
        raise PrepareError(f"no source files found in {', '.join(names)}")
    return found


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _progress_bar(total: int, mode: str):
    disable = mode == "off" or (mode == "auto" and not sys.stderr.isatty())
    try:
        from tqdm import tqdm
    except ImportError:  # the optional `progress` extra is not installed
        return _NoProgress()
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=disable, file=sys.stderr)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass
