"""The `tokens` (prepared corpus) and `hf_datasets` (local Parquet) sources: windows read from
the mapped file, exact resume after SIGKILL, every window of the epoch once when resumed
on another world size, and bad corpora refused with one line naming the file."""
import json
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CONFIGS, ROOT, clean_env, extended, final_weights, run_train
from corpora import documents, train_tokenizer, write_parquet, write_text
from lm_faults import recorded_rows

SEQ, GLOBAL, STEPS, EVERY = 16, 32, 12, 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prepared corpus of ~600 windows of 16 tokens and the same documents as Parquet, with
    eval fractions that leave 12 steps' worth of training windows in each."""
    from distrain.data.hf_datasets import hf_dataset
    from distrain.data.tokens import prepared_corpus

    d = tmp_path_factory.mktemp("lm")
    docs = documents(80, seed=2, words_per_doc=(20, 150))
    tokenizer = train_tokenizer(d / "tokenizer.json", docs, vocab_size=300)
    write_text(d / "docs.txt", docs)
    subprocess.run([sys.executable, "-m", "distrain", "prepare", "--tokenizer", str(tokenizer), "--out",
                    str(d / "prepared"), "--eos", "<|endoftext|>", str(d / "docs.txt")],
                   check=True, env=clean_env(), cwd=ROOT, capture_output=True)
    parquet = write_parquet(d / "docs.parquet", docs, row_group_size=25)
    sources = {
        "tokens": ["data.name=tokens", f"data.path={d / 'prepared'}"],
        "hf": ["data.name=hf_datasets", f"data.path={parquet}", f"data.tokenizer={tokenizer}",
               "data.eos=<|endoftext|>"],
    }
    windows = {"tokens": len(prepared_corpus(str(d / "prepared"), SEQ, eval_fraction=0)[0]),
               "hf": len(hf_dataset(str(parquet), str(tokenizer), SEQ, eos="<|endoftext|>", eval_fraction=0)[0])}
    n_train = STEPS * GLOBAL
    for name, n in windows.items():
        assert n > n_train + 10, n
        sources[name].append(f"data.eval_fraction={(n - n_train) / n}")
    return {"dir": d, "tokenizer": tokenizer, "sources": sources, "n_train": n_train}


def train_set(data, source):
    from distrain.data import build_datasets
    from distrain.config import load_config

    cfg = load_config(str(CONFIGS / "gpt_tiny.yaml"), [*data["sources"][source], f"data.seq_len={SEQ}"])
    return build_datasets(cfg.data)


def args_for(data, source, run, steps=STEPS, **model):
    return ["--config", CONFIGS / "gpt_tiny.yaml", f"run.dir={run}", "model.name=tests.lm_faults:recording_gpt",
            "model.d_model=32", *data["sources"][source], f"data.seq_len={SEQ}", f"data.global_batch_size={GLOBAL}",
            "data.micro_batch_size=8", "data.eval_batch_size=64", f"train.max_steps={steps}", "train.eval_every=5",
            "train.log_every=4", f"checkpoint.every_steps={EVERY}", "sched.name=constant", "sched.warmup_steps=0",
            *[f"model.{k}={v}" for k, v in model.items()]]


def test_windows_are_slices_of_the_token_file_and_eval_is_held_out(data):
    from distrain.data.tokens import IGNORE_INDEX, prepared_corpus

    path = data["dir"] / "prepared"
    tokens_file = np.fromfile(path / "tokens.bin", dtype=np.uint16).astype(np.int64)
    offsets = np.load(path / "documents.npy")
    train, evaluation, meta = prepared_corpus(str(path), seq_len=SEQ, eval_fraction=0.1)
    assert meta == {"task": "lm", "vocab_size": 300, "seq_len": SEQ}
    assert len(train) + len(evaluation) == (len(tokens_file) - 1) // SEQ and evaluation.window_id(0) == len(train)
    for ds, i in [(train, 0), (train, 17), (train, len(train) - 1), (evaluation, len(evaluation) - 1)]:
        x, y = ds[i]
        start = ds.window_id(i) * SEQ
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (SEQ,)
        assert x.tolist() == tokens_file[start : start + SEQ].tolist()
        assert y.tolist() == tokens_file[start + 1 : start + SEQ + 1].tolist()
    masked, _, _ = prepared_corpus(str(path), seq_len=SEQ, eval_fraction=0.1, doc_mask=True)
    starts = set(offsets.tolist())
    for i in range(len(train)):
        x, y = masked[i]
        targets = range(i * SEQ + 1, i * SEQ + SEQ + 1)
        assert [t in starts for t in targets] == (y == IGNORE_INDEX).tolist()
        assert x.tolist() == train[i][0].tolist()


def test_the_mapped_file_is_opened_in_each_process_not_pickled(data):
    from torch.utils.data import DataLoader

    train, _, _ = train_set(data, "tokens")
    train[3]  # opens the map here
    assert len(pickle.dumps(train)) < 1000
    batches = lambda workers: [b for b in DataLoader(train, batch_size=50, num_workers=workers)]  # noqa: E731
    assert all(a[0].equal(b[0]) and a[1].equal(b[1]) for a, b in zip(batches(0), batches(2)))


STRATEGY = {1: ["strategy.name=single"], 2: ["strategy.name=ddp"], 4: ["strategy.name=ddp"]}
KILLS = [("tokens", 1, 0), ("tokens", 2, 1), ("hf", 1, 1)]  # (source, processes, data.num_workers)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    cache = {}

    def get(source, nproc):
        if (source, nproc) not in cache:
            run = tmp_path_factory.mktemp(f"ref-{source}-{nproc}") / "run"
            run_train(args_for(data, source, run) + STRATEGY[nproc], nproc=0 if nproc == 1 else nproc)
            cache[source, nproc] = final_weights(run)
        return cache[source, nproc]
    return get


@pytest.mark.parametrize("source, nproc, workers", extended(KILLS, {("tokens", 1, 0), ("hf", 1, 1)}),
                         ids=[f"{s}-{n}proc-{w}workers" for s, n, w in KILLS])
def test_sigkill_at_a_random_point_then_resume_is_bitwise_exact(source, nproc, workers, data, reference, tmp_path):
    forwards, first_checkpoint = STEPS * GLOBAL // 8 // nproc, EVERY * GLOBAL // 8 // nproc  # micro-batches of 8
    kill_at = random.Random(f"{source}{nproc}").randrange(first_checkpoint + 1, forwards - 1)
    args = args_for(data, source, tmp_path / "run", kill_at=kill_at, marker=tmp_path / "killed") + STRATEGY[nproc]
    args.append(f"data.num_workers={workers}")
    launch = 0 if nproc == 1 else nproc
    assert run_train(args, nproc=launch, check=False).returncode != 0, f"no kill at forward {kill_at}"
    resumed = run_train(args, nproc=launch)
    assert "resumed from" in resumed.stdout + resumed.stderr
    ours, ref = final_weights(tmp_path / "run"), reference(source, nproc)
    assert all(ours[k].equal(ref[k]) for k in ref), f"killed at forward {kill_at}: weights differ"


RESHARD = [("tokens", 1), ("tokens", 4), ("hf", 1), ("hf", 4)]


@pytest.mark.parametrize("source, new_world", extended(RESHARD, {("hf", 4)}),
                         ids=[f"{s}-2to{w}" for s, w in RESHARD])
def test_resume_on_another_world_size_sees_each_window_once(source, new_world, data, tmp_path):
    train, _, _ = train_set(data, source)
    window_of = {tuple(train[i][0].tolist()): i for i in range(len(train))}
    assert len(train) == data["n_train"] and len(window_of) == len(train), "windows must be distinguishable"
    run, record = tmp_path / "run", tmp_path / "rows"
    run_train(args_for(data, source, run, steps=5, record=record) + STRATEGY[2], nproc=2)
    resumed = run_train(args_for(data, source, run, record=record) + STRATEGY[new_world],
                        nproc=0 if new_world == 1 else new_world)
    assert "at step 5 (epoch 0, 160 samples into it)" in resumed.stdout
    seen = sorted(window_of[row] for row in recorded_rows(record))
    assert seen == list(range(data["n_train"])), "each window of the epoch exactly once"


def copy_corpus(data, tmp_path):
    import shutil

    return shutil.copytree(data["dir"] / "prepared", tmp_path / "corpus")


CORRUPTIONS = {
    "missing directory": (lambda c, t: c.rename(c.with_name("gone")), "data.path", "corpus: no such directory"),
    "interrupted prepare": (lambda c, t: (c / "manifest.json").unlink(), "data.path",
                            "manifest.json: not found: not a finished `distrain prepare` output"),
    "odd size": (lambda c, t: open(c / "tokens.bin", "ab").write(b"\0"), "data.path",
                 "bytes is not a multiple of the uint16 token width (2 bytes)"),
    "truncated": (lambda c, t: (c / "tokens.bin").write_bytes((c / "tokens.bin").read_bytes()[:-200]), "data.path",
                  "tokens.bin: holds {short} tokens but manifest.json says {n}"),
    "documents changed": (lambda c, t: np.save(c / "documents.npy", np.arange(5)), "data.path",
                          "documents.npy: does not match manifest.json"),
    "tokenizer changed": (lambda c, t: t.write_text(t.read_text().replace('"ka"', '"kb"')), "data.tokenizer",
                          "tokenizer.json: tokenizer changed since `distrain prepare`"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_bad_corpus_is_a_config_error_naming_the_file(case, data, tmp_path):
    import shutil

    from distrain.config import ConfigError
    from distrain.data.tokens import prepared_corpus

    corpus, tokenizer = copy_corpus(data, tmp_path), tmp_path / "tokenizer.json"
    shutil.copy(data["tokenizer"], tokenizer)
    damage, key, message = CORRUPTIONS[case]
    damage(corpus, tokenizer)
    n = json.loads((data["dir"] / "prepared" / "manifest.json").read_text())["tokens"]
    message = message.format(n=n, short=n - 100)
    with pytest.raises(ConfigError) as caught:
        prepared_corpus(str(corpus), seq_len=SEQ, tokenizer=str(tokenizer))
    assert caught.value.key == key and message in str(caught.value), str(caught.value)


def test_a_truncated_token_file_exits_2_with_one_line(data, tmp_path):
    corpus = copy_corpus(data, tmp_path)
    with open(corpus / "tokens.bin", "r+b") as f:
        f.truncate(1001)
    proc = run_train(args_for(data, "tokens", tmp_path / "run") + [f"data.path={corpus}"], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"distrain: error: config key 'data.path': {corpus / 'tokens.bin'}: size 1001 bytes is not a multiple of the "
        "uint16 token width (2 bytes): truncated or not a token file"]
    assert not (tmp_path / "run").exists()


def test_hf_rows_mode_pads_batches_and_the_tokenized_cache_is_reused(data, tmp_path):
    from tokenizers import Tokenizer

    from distrain.data.hf_datasets import hf_dataset

    docs = documents(30, seed=5, words_per_doc=(3, 40))
    parquet = write_parquet(tmp_path / "rows.parquet", docs, row_group_size=10)
    build = lambda: hf_dataset(str(parquet), str(data["tokenizer"]), seq_len=24, mode="rows",  # noqa: E731
                                pad_token="<|endoftext|>", eval_fraction=0.1)
    train, evaluation, meta = build()
    tokenizer = Tokenizer.from_file(str(data["tokenizer"]))
    expected = [tokenizer.encode(d).ids[:24] for d in docs]
    assert len(train) == 27 and len(evaluation) == 3
    assert [train[i]["input_ids"].tolist() for i in range(27)] == expected[:27]
    batch = meta["collate"]([train[i] for i in range(4)])
    pad = tokenizer.token_to_id("<|endoftext|>")
    for row, ids in enumerate(expected[:4]):
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids and set(batch["input_ids"][row, n:].tolist()) <= {pad}
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][row, :n].tolist() == ids and set(batch["labels"][row, n:].tolist()) <= {-100}
    cache = tmp_path / "rows.parquet.cache"
    before = {p: p.stat().st_mtime_ns for p in cache.glob("tokenized-*.arrow")}
    build()
    assert len(before) == 1 and {p: p.stat().st_mtime_ns for p in cache.glob("tokenized-*.arrow")} == before
    hf_dataset(str(parquet), str(data["tokenizer"]), seq_len=12, mode="rows", pad_token="<|endoftext|>")
    assert len(list(cache.glob("tokenized-*.arrow"))) == 2, "another seq_len is another cache"


def test_hf_windows_from_a_saved_dataset_match_the_tokenizer_applied_directly(data, tmp_path):
    import datasets
    from tokenizers import Tokenizer

    from distrain.data.hf_datasets import MAP_BATCH, hf_dataset

    docs = documents(1500, seed=7, words_per_doc=(3, 30))
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    train, evaluation, meta = hf_dataset(str(tmp_path / "saved"), str(data["tokenizer"]), seq_len=SEQ,
                                         text_field="body", eos="<|endoftext|>", eval_fraction=0.05)
    tokenizer = Tokenizer.from_file(str(data["tokenizer"]))
    eos = tokenizer.token_to_id("<|endoftext|>")
    windows = []
    for start in range(0, len(docs), MAP_BATCH):  # packed within each map batch, the remainder dropped
        stream = [t for d in docs[start : start + MAP_BATCH] for t in tokenizer.encode(d).ids + [eos]]
        windows += [stream[k * SEQ : (k + 1) * SEQ + 1] for k in range((len(stream) - 1) // SEQ)]
    got = [torch.cat([x, y[-1:]]).tolist() for x, y in (list(train) + list(evaluation))]
    assert got == windows and len(evaluation) == round(len(windows) * 0.05)
    assert all(torch.equal(train[i][0][1:], train[i][1][:-1]) for i in range(len(train)))
    assert meta == {"task": "lm", "vocab_size": 300, "seq_len": SEQ}


def test_a_bad_jsonl_row_is_named_by_file_and_line_or_skipped_on_request(data, tmp_path, caplog):
    from distrain.config import ConfigError
    from distrain.data.hf_datasets import hf_dataset

    rows = [json.dumps({"text": f"ka lo mi {i}"}) for i in range(40)]
    rows.insert(30, '{"text": "unterminated')
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(rows) + "\n")
    with pytest.raises(ConfigError, match=r"rows\.jsonl:31: not a JSON row .*data\.on_bad_row=skip"):
        hf_dataset(str(source), str(data["tokenizer"]), 4, mode="rows")
    train, evaluation, _ = hf_dataset(str(source), str(data["tokenizer"]), 4, mode="rows", on_bad_row="skip",
                                      eos="<|endoftext|>", eval_fraction=0.1)
    assert len(train) + len(evaluation) == 40
    assert [r.getMessage() for r in caplog.records if "rows.jsonl:31" in r.getMessage() and "skipped" in r.getMessage()]
