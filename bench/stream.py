"""The streaming source against training: `hf_datasets` with streaming=true (8 Parquet files
read as shards, tokenized as they are read) through distrain's StreamLoader, one process, one
thread, against the tokens/s the tiny GPT trains at on the same stream, and the share of the
training step spent waiting for data (metrics.jsonl data_wait_s / step_time_s).

    python bench/stream.py [--rounds 3] [--docs 4000]

Targets: loader >= 20x training's consumption; data_wait_s <= 1% of the step.
Every measurement is a fresh process; rounds interleave the cases; medians with min-max.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from data import ENV, ROOT, python, spread, timed_loader

SEQ, BATCH = 256, 32

LOADER = """
from distrain.data.hf_datasets import hf_dataset
from distrain.data.streams import StreamLoader
from distrain.dist import Collectives
train = hf_dataset({path!r}, {tokenizer!r}, seq_len={seq}, eos="<|endoftext|>", streaming=True)[0]
loader = StreamLoader(train, {batch}, 1, 1, 0, 0, 0, torch.device("cpu"), Collectives(torch.device("cpu")))
"""


def make_files(work: Path, docs_count: int) -> tuple[Path, Path]:
    from corpora import documents, train_tokenizer, write_parquet

    docs = documents(docs_count, seed=0)
    tokenizer = train_tokenizer(work / "tokenizer.json", docs[:400], vocab_size=4000)
    files = work / "files"
    files.mkdir()
    per = -(-len(docs) // 9)
    for i in range(9):  # eight to train on, the last held out
        write_parquet(files / f"part{i}.parquet", docs[i * per : (i + 1) * per])
    return files, tokenizer


def train(files: Path, tokenizer: Path, run: Path, workers: int, steps: int) -> dict:
    args = ["--config", str(ROOT / "configs" / "gpt_tiny.yaml"), f"run.dir={run}", "data.name=hf_datasets",
            f"data.path={files}", f"data.tokenizer={tokenizer}", "data.eos=<|endoftext|>", "data.streaming=true",
            f"data.seq_len={SEQ}", f"data.global_batch_size={BATCH}", f"data.num_workers={workers}",
            f"train.max_steps={steps}", "train.eval_every=0", "train.log_every=10", "log.progress=off",
            "checkpoint.resume=never", "data.eval_batch_size=8"]
    subprocess.run([sys.executable, "-m", "distrain.train", *args], check=True, capture_output=True, env=ENV, cwd=ROOT)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if x["split"] == "train" and x["step"] > 10]
    return {"tokens_per_s": statistics.median(x["tokens_per_s"] for x in rows),
            "wait_share": sum(x["data_wait_s"] for x in rows) / sum(x["step_time_s"] for x in rows)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--docs", type=int, default=4000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        work = Path(tmp)
        files, tokenizer = make_files(work, args.docs)
        loader, training, waits = [], [], {0: [], 2: []}
        for r in range(args.rounds):
            setup = LOADER.format(path=str(files), tokenizer=str(tokenizer), seq=SEQ, batch=BATCH)
            loader.append(float(python(timed_loader(setup, 5, 100, BATCH, SEQ))))
            for workers in waits:
                result = train(files, tokenizer, work / f"train-{r}-{workers}", workers, 40)
                waits[workers].append(100 * result["wait_share"])
                if workers == 0:
                    training.append(result["tokens_per_s"])
        print(json.dumps({"loader_tokens_per_s": spread(loader), "training_tokens_per_s": spread(training),
                          "ratio": spread([a / b for a, b in zip(loader, training)]),
                          **{f"data_wait % of step, {w} workers": spread(v) for w, v in waits.items()}}, indent=1))


if __name__ == "__main__":
    main()
