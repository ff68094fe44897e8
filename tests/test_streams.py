"""Streams (IterableDatasets with shards): the data position kept per shard, so that a run
SIGKILLed anywhere resumes bitwise on the same world size and worker count, and uses each
sample of the epoch exactly once on another; the same for Hugging Face streaming from local
Parquet files; a stream without shards is warned about."""
import logging
import random

import pytest
import torch

from conftest import CONFIGS, extended, final_weights, run_train
from corpora import documents, train_tokenizer, write_parquet
from lm_faults import recorded_rows
from streams_tiny import Unsharded, windows

from distrain.data.streams import StreamLoader
from distrain.dist import Collectives

SEQ, MICRO, GLOBAL = 16, 8, 32


def all_windows(stream) -> list[tuple]:
    return [tuple(x.tolist()) for i in range(stream.num_shards) for x, _ in stream.iter_shard(i, 0)]


def loader(stream, workers: int, epochs=None, micro=MICRO, accumulation=2):
    return StreamLoader(stream, micro, accumulation, 1, 0, workers, seed=3, device=torch.device("cpu"),
                        comm=Collectives(torch.device("cpu")), epochs=epochs)


def take(ld, steps: int | None = None) -> list[list[tuple]]:
    """Each step's real rows, in order, until `steps` steps or the loader's last epoch ends."""
    out = []
    while (steps is None or len(out) < steps) and not ld.finished:
        batch, micro = ld.next_step()
        out.append([tuple(row.tolist()) for mb, real in zip(micro, batch.real) if real for row in mb[0]])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_uses_every_sample_once_and_a_resume_continues_it_exactly(workers):
    stream, _, _ = windows(seq_len=SEQ)
    whole = take(loader(stream, workers, epochs=1))
    assert sorted(r for step in whole for r in step) == sorted(all_windows(stream))
    # full steps, but where a reader's last batch is short, and the last step
    assert sum(len(step) < MICRO * 2 for step in whole) <= max(1, workers) + 1

    first = loader(stream, workers, epochs=1)
    before = take(first, 5)
    first.sync(first.comm)
    state = first.state_dict()
    first.close()
    same = loader(stream, workers, epochs=1)
    same.load_state_dict(state)
    assert before + take(same) == whole, "same readers: the same batches in the same order"
    other = loader(stream, 1 if workers else 2, epochs=1)
    other.load_state_dict(state)
    rest = take(other)
    assert sorted(r for step in before + rest for r in step) == sorted(all_windows(stream))


def test_a_stream_without_shards_is_read_whole_with_one_warning(caplog):
    stream, _, _ = windows(seq_len=SEQ)
    with caplog.at_level(logging.WARNING, logger="distrain"):
        steps = take(loader(Unsharded(stream), 0, epochs=2))
    assert [r.getMessage() for r in caplog.records if "has no shards" in r.getMessage()] != []
    assert len(caplog.records) == 1
    rows = [r for step in steps for r in step]
    assert rows == all_windows(stream) * 2, "as torch reads it: in order, twice for two epochs"


def test_a_hugging_face_iterable_dataset_is_read_by_its_own_shards():
    import datasets

    rows = datasets.Dataset.from_dict({"input_ids": [[i, i + 1, i + 2] for i in range(60)]})
    stream = rows.to_iterable_dataset(num_shards=6)
    ids = lambda steps: sorted(int(x) for step in steps for x in step)  # noqa: E731

    def take_ids(ld, steps=None):
        out = []
        while (steps is None or len(out) < steps) and not ld.finished:
            batch, micro = ld.next_step()
            out.append([x for mb, real in zip(micro, batch.real) if real for x in mb["input_ids"][:, 0].tolist()])
        return out

    first = loader(stream, 2, epochs=1, micro=4)
    before = take_ids(first, 3)
    first.sync(first.comm)
    state = first.state_dict()
    assert state["shards"] == 6 and sum(state["offset"]) == 3 * 2 * 4
    other = loader(stream, 1, epochs=1, micro=4)
    other.load_state_dict(state)
    assert ids(before + take_ids(other)) == list(range(60))


def args_for(run, nproc, extra=(), source=("data.name=tests.streams_tiny:windows",), **model):
    return ["--config", CONFIGS / "gpt_tiny.yaml", f"run.dir={run}", "model.name=tests.lm_faults:recording_gpt",
            "model.d_model=32", *source, f"data.seq_len={SEQ}", f"data.global_batch_size={GLOBAL}",
            f"data.micro_batch_size={MICRO}", "data.num_workers=2", "train.max_steps=null", "train.epochs=1",
            "train.eval_every=3", "train.log_every=2", "checkpoint.every_steps=2", "sched.name=constant",
            "sched.warmup_steps=0", f"strategy.name={'single' if nproc == 1 else 'ddp'}",
            *[f"model.{k}={v}" for k, v in model.items()], *extra]


def launch(args, nproc, check=True):
    return run_train(args, nproc=0 if nproc == 1 else nproc, check=check)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    """Nine Parquet files of generated documents (eight shards to train on, one held out) and a
    tiny BPE tokenizer."""
    d = tmp_path_factory.mktemp("pq")
    docs = documents(90, seed=3, words_per_doc=(20, 120))
    tokenizer = train_tokenizer(d / "tokenizer.json", docs, vocab_size=300)
    (d / "files").mkdir()
    for i in range(9):
        write_parquet(d / "files" / f"part{i}.parquet", docs[i * 10 : (i + 1) * 10])
    return ["data.name=hf_datasets", f"data.path={d / 'files'}", f"data.tokenizer={tokenizer}",
            "data.eos=<|endoftext|>", "data.streaming=true"]


SOURCES = {"torch": lambda request: ("data.name=tests.streams_tiny:windows",),
           "hf": lambda request: request.getfixturevalue("parquet")}


def source_windows(source_args) -> list[tuple]:
    from distrain.config import load_config
    from distrain.data import build_datasets

    cfg = load_config(str(CONFIGS / "gpt_tiny.yaml"), [*source_args, f"data.seq_len={SEQ}"])
    return all_windows(build_datasets(cfg.data)[0])


KILLS = [("torch", 2), ("hf", 1)]


@pytest.mark.parametrize("source, nproc", extended(KILLS, {("hf", 1)}), ids=[f"{s}-{n}proc" for s, n in KILLS])
def test_sigkill_at_a_random_point_then_resume_is_bitwise_exact(source, nproc, request, tmp_path):
    src = SOURCES[source](request)
    reference = tmp_path / "reference"
    launch(args_for(reference, nproc, source=src), nproc)
    forwards, first_checkpoint = len(source_windows(src)) // (MICRO * nproc), 2 * GLOBAL // (MICRO * nproc)
    kill_at = random.Random(f"streams-{source}").randrange(first_checkpoint + 1, forwards - 2)
    args = args_for(tmp_path / "run", nproc, source=src, kill_at=kill_at, marker=tmp_path / "killed")
    assert launch(args, nproc, check=False).returncode != 0, f"no kill at forward {kill_at}"
    resumed = launch(args, nproc)
    assert "resumed from" in resumed.stdout + resumed.stderr
    ours, ref = final_weights(tmp_path / "run"), final_weights(reference)
    assert all(ours[k].equal(ref[k]) for k in ref), f"killed at forward {kill_at}: weights differ"


RESHARD = [("torch", 1), ("torch", 4), ("hf", 1)]


@pytest.mark.parametrize("source, new_world", extended(RESHARD, {("torch", 1)}),
                         ids=[f"{s}-2to{w}" for s, w in RESHARD])
def test_resume_on_another_world_size_uses_each_sample_once(source, new_world, request, tmp_path):
    src = SOURCES[source](request)
    expected = source_windows(src)
    assert len(set(expected)) == len(expected), "windows must be distinguishable"
    run, record = tmp_path / "run", tmp_path / "rows"
    launch(args_for(run, 2, source=src, extra=["train.max_steps=3", "train.epochs=null"], record=record), 2)
    resumed = launch(args_for(run, new_world, source=src, record=record), new_world)
    assert "resumed from" in resumed.stdout and "dealt again" in (run / "logs" / "rank0.log").read_text()
    seen = recorded_rows(record)
    standin = expected[0]  # a rank out of samples runs its stream's first sample with zero weight
    assert sorted(r for r in seen if r != standin) == sorted(r for r in expected if r != standin)
    assert standin in seen


def test_a_cosine_schedule_needs_max_steps_with_a_stream(tmp_path):
    proc = run_train(args_for(tmp_path / "run", 1, extra=["sched.name=cosine"]), check=False)
    assert proc.returncode == 2 and "sched.name" in proc.stderr and "train.max_steps" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()
