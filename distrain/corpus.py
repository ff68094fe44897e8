"""A prepared token corpus on disk, shared by its writer (`distrain prepare`) and its reader
(the `tokens` data source): the file names, the manifest, and the checks that a directory
holds a finished, self-consistent corpus made with the tokenizer the user expects.

    tokens.bin      every document's token ids back to back, uint16 (or uint32 for vocabularies over 65,535)
    documents.npy   int64 offsets of the documents in tokens.bin, plus the total at the end
    manifest.json   written last: dtype, counts, tokenizer sha256, the source files

Kept free of torch so that `distrain prepare` and its worker processes start quickly.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

TOKENS, DOCUMENTS, MANIFEST = "tokens.bin", "documents.npy", "manifest.json"
FORMAT = "distrain-tokens/1"


class CorpusError(Exception):
    """A corpus file that is missing, unfinished or inconsistent; the message names the file."""

    def __init__(self, path, problem: str):
        self.path = Path(path)
        super().__init__(f"{path}: {problem}")


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise CorpusError(directory, "no such directory; make it with `distrain prepare`")
    if not path.is_file():
        raise CorpusError(path, "not found: not a finished `distrain prepare` output (run it, or rerun an "
                                "interrupted one)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorpusError(path, f"not valid JSON ({e})")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(path, f"not a {FORMAT} manifest")
    return manifest


def check_files(directory, manifest: dict) -> None:
    """The data files agree with the manifest: sizes and document offsets (their ends only, so
    a corpus of any size is checked without being read)."""
    directory = Path(directory)
    tokens, documents = directory / TOKENS, directory / DOCUMENTS
    width = np.dtype(manifest["dtype"]).itemsize
    if not tokens.is_file():
        raise CorpusError(tokens, "not found")
    size = tokens.stat().st_size
    if size % width:
        raise CorpusError(tokens, f"size {size} bytes is not a multiple of the {manifest['dtype']} token width "
                                  f"({width} bytes): truncated or not a token file")
    if size // width != manifest["tokens"]:
        raise CorpusError(tokens, f"holds {size // width} tokens but {MANIFEST} says {manifest['tokens']}: "
                                  "changed since `distrain prepare`; prepare it again")
    if not documents.is_file():
        raise CorpusError(documents, "not found")
    try:
        offsets = np.load(documents, mmap_mode="r")
    except ValueError as e:
        raise CorpusError(documents, f"not a .npy array ({e})")
    if (offsets.ndim != 1 or len(offsets) != manifest["documents"] + 1 or offsets[0] != 0
            or offsets[-1] != manifest["tokens"]):
        raise CorpusError(documents, f"does not match {MANIFEST} ({manifest['documents']} documents, "
                                     f"{manifest['tokens']} tokens); prepare it again")


def check_tokenizer(manifest: dict, tokenizer: str | None, manifest_path) -> None:
    """The tokenizer the corpus was made with is the one in use: `tokenizer` if given, else
    the file recorded in the manifest where it still exists."""
    recorded = manifest["tokenizer"]
    path = Path(tokenizer) if tokenizer else Path(recorded["path"])
    if not path.is_file():
        if tokenizer:
            raise CorpusError(path, "tokenizer file not found")
        return
    if file_sha256(path) != recorded["sha256"]:
        raise CorpusError(path, f"tokenizer changed since `distrain prepare` made {manifest_path} "
                                f"(sha256 differs); prepare the corpus again")
