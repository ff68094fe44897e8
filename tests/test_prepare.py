"""`distrain prepare`: the tokenizer's own ids, in parallel; reruns that do nothing; an
interrupted run that is never taken for a finished one; bad rows named by file and line."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, clean_env
from corpora import (documents, expected_ids, text_documents, train_tokenizer, write_jsonl, write_parquet,
                     write_text)

EOS = "<|endoftext|>"


def prepare(*args, check=True, **popen):
    proc = subprocess.run([sys.executable, "-m", "distrain", "prepare", *map(str, args)], capture_output=True,
                          text=True, env=clean_env(), cwd=ROOT, timeout=120, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """About 3.5 MB: a text file of blank-line separated documents and a JSONL file."""
    d = tmp_path_factory.mktemp("corpus")
    docs = documents(3000, seed=1)
    text, jsonl = write_text(d / "a.txt", docs[:2000]), write_jsonl(d / "b.jsonl", docs[2000:])
    tokenizer = train_tokenizer(d / "tokenizer.json", docs[:300])
    expected = text_documents(text) + [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    return {"dir": d, "sources": [text, jsonl], "tokenizer": tokenizer, "docs": expected}


@pytest.fixture(scope="module")
def prepared(corpus):
    out = corpus["dir"] / "prepared"
    prepare("--tokenizer", corpus["tokenizer"], "--out", out, "--eos", EOS, "--workers", 2, "--chunk-mb", 0.1,
            *corpus["sources"])
    return out


def read_corpus(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return np.fromfile(out / "tokens.bin", dtype=manifest["dtype"]), np.load(out / "documents.npy"), manifest


def test_prepare_gives_the_tokenizers_own_ids_and_a_rerun_does_nothing(corpus, prepared):
    tokens, offsets, manifest = read_corpus(prepared)
    ids, expected_offsets = expected_ids(corpus["tokenizer"], corpus["docs"], EOS)
    assert tokens.dtype == np.uint16 and np.array_equal(tokens, ids)
    assert np.array_equal(offsets, expected_offsets)
    assert manifest["tokens"] == len(ids) and manifest["documents"] == len(corpus["docs"]) == 3000
    assert [s["documents"] for s in manifest["sources"]] == [2000, 1000]
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(corpus["tokenizer"].read_bytes()).hexdigest()
    before = {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()}
    again = prepare("--tokenizer", corpus["tokenizer"], "--out", prepared, "--eos", EOS, *corpus["sources"])
    assert "up to date" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in prepared.iterdir()} == before


def test_one_worker_and_parquet_give_the_same_ids(corpus, tmp_path):
    docs = corpus["docs"][:700]
    source = write_parquet(tmp_path / "docs.parquet", docs, row_group_size=100)
    prepare("--tokenizer", corpus["tokenizer"], "--out", tmp_path / "out", "--workers", 1, source)
    tokens, offsets, manifest = read_corpus(tmp_path / "out")
    ids, expected_offsets = expected_ids(corpus["tokenizer"], docs)
    assert np.array_equal(tokens, ids) and np.array_equal(offsets, expected_offsets)
    assert manifest["sources"][0]["format"] == "parquet"


def test_sigkill_mid_prepare_leaves_no_finished_corpus_and_a_rerun_gives_the_same_files(corpus, prepared, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "distrain", "prepare", "--tokenizer", corpus["tokenizer"], "--out", out, "--eos", EOS,
            "--workers", 2, "--chunk-mb", 0.02, "--progress", "on", *corpus["sources"]]
    proc = subprocess.Popen(list(map(str, args)), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=clean_env(),
                            cwd=ROOT, start_new_session=True)
    seen = b""
    while True:  # the progress bar says when part of the corpus is written
        block = proc.stderr.read1(4096)
        seen += block
        if not block or any(0 < int(p) < 60 for p in re.findall(rb"tokenizing:\s+(\d+)%", seen)):
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (out / "manifest.json").exists() and (out / ".partial").is_dir()
    prepare("--tokenizer", corpus["tokenizer"], "--out", out, "--eos", EOS, "--workers", 2, *corpus["sources"])
    for name in ("tokens.bin", "documents.npy"):
        assert (out / name).read_bytes() == (prepared / name).read_bytes()
    assert not (out / ".partial").exists()
    assert read_corpus(out)[2]["tokens"] == read_corpus(prepared)[2]["tokens"]


def test_corrupt_jsonl_rows_are_fatal_or_skipped_with_file_and_line(corpus, tmp_path):
    good = corpus["docs"][:40]
    lines = [json.dumps({"text": d}) for d in good]
    lines[6:6] = ['{"text": "cut off']          # line 7: not JSON
    lines[20:20] = ['{"title": "no text"}']     # line 21: no field
    lines[30:30] = ['["a", "list"]', '{"text": 5}']  # lines 31, 32
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(lines) + "\n")
    base = ["--tokenizer", corpus["tokenizer"], "--out", tmp_path / "out", "--chunk-mb", 0.001, "--workers", 2, source]
    skipped = prepare(*base, "--on-bad-row", "skip")
    warnings = [line for line in skipped.stderr.splitlines() if "warning" in line]
    assert [re.search(r":line (\d+):", w).group(1) for w in warnings] == ["7", "21", "31", "32"]
    assert "has no field 'text'" in warnings[1] and "not a string" in warnings[3]
    tokens, offsets, manifest = read_corpus(tmp_path / "out")
    assert np.array_equal(tokens, expected_ids(corpus["tokenizer"], good)[0])
    assert manifest["sources"][0]["skipped_rows"] == 4
    finished = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    fatal = prepare(*base, check=False)
    assert fatal.returncode == 2 and len(fatal.stderr.strip().splitlines()) == 1
    assert f"{source}:line 7: not valid JSON" in fatal.stderr and "Traceback" not in fatal.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == finished, "the finished corpus changed"


def test_bad_inputs_exit_2_with_one_line(corpus, tmp_path):
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"fine text\n\nbroken \xff\xfe here\n")
    parquet = write_parquet(tmp_path / "p.parquet", ["a b c"])
    cases = [
        (["--tokenizer", tmp_path / "none.json", corpus["sources"][0]], "none.json not found"),
        (["--tokenizer", corpus["sources"][1], corpus["sources"][0]], "not a tokenizers tokenizer.json"),
        (["--tokenizer", corpus["tokenizer"], tmp_path / "missing.txt"], "missing.txt: no such file"),
        (["--tokenizer", corpus["tokenizer"], corpus["tokenizer"].with_suffix(".bin")], "no such file"),
        (["--tokenizer", corpus["tokenizer"], bad_utf8], f"{bad_utf8}: not valid UTF-8 at byte 18"),
        (["--tokenizer", corpus["tokenizer"], "--text-field", "body", parquet], "no column 'body'"),
        (["--tokenizer", corpus["tokenizer"], "--eos", "<nope>", parquet], "no token '<nope>'"),
    ]
    (tmp_path / "data.csv").write_text("a,b\n")
    cases.append((["--tokenizer", corpus["tokenizer"], tmp_path / "data.csv"], "unknown kind of file"))
    for args, message in cases:
        proc = prepare(*args, "--out", tmp_path / "out", check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, (message, proc.stderr)


def test_a_vocabulary_over_65535_tokens_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("w69999 w3 w65536\n\nw7 x\n")
    prepare("--tokenizer", tmp_path / "tokenizer.json", "--out", tmp_path / "out", tmp_path / "a.txt")
    tokens, offsets, manifest = read_corpus(tmp_path / "out")
    assert manifest["dtype"] == "uint32" and tokens.tolist() == [70000, 4, 65537, 8, 0]
    assert offsets.tolist() == [0, 3, 5]


def test_a_second_prepare_into_the_same_directory_waits_for_the_first(corpus, prepared, tmp_path):
    import fcntl

    out = tmp_path / "prepared"
    out.mkdir()
    with open(out / ".prepare.lock", "a") as held:  # as a first prepare still writing would hold it
        fcntl.flock(held, fcntl.LOCK_EX)
        second = subprocess.Popen([sys.executable, "-m", "distrain", "prepare", "--tokenizer", str(corpus["tokenizer"]),
                                   "--out", str(out), "--eos", EOS, *map(str, corpus["sources"])],
                                  stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env(), cwd=ROOT)
        assert "waiting for another prepare" in second.stderr.readline()
        assert second.poll() is None and not (out / "manifest.json").exists()
    assert second.wait(timeout=120) == 0
    assert np.array_equal(read_corpus(out)[0], read_corpus(prepared)[0])
