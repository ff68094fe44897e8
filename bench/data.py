"""Token data: loader speed against training, `distrain prepare` against the tokenizer, and
a rank's memory on a corpus larger than a gigabyte.

    python bench/data.py [--parts loader prepare rss] [--rounds 3] [--gb 1.0]

- loader: windows/s of the memory-mapped `tokens` source through distrain's own loader
  (StepLoader, ResumableSampler, DataLoader), one process, one thread, against the tokens/s
  the tiny GPT trains at on the same corpus (metrics.jsonl's tokens_per_s). Target >= 20x.
- prepare: MB/s (and MB per CPU second) of `distrain prepare` with 1 and 2 processes against
  the tokenizer's own encode_batch on the same documents, one thread and its default
  threads. Target: per process >= 0.8x of the one-thread encode_batch.
- rss: peak RSS of a training process on a generated corpus of --gb GB against the same
  run on a 4 MB corpus, with and without the periodic release of mapped pages. Target: < 64 MB more.
Every measurement is a fresh process; rounds interleave the cases; medians with min-max.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
SEQ, BATCH = 256, 32


def spread(values) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f}-{max(values):,.1f})"


def python(code: str, env=None) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                          env=env or ENV, cwd=ROOT).stdout


def make_corpus(work: Path, mb: float) -> tuple[Path, Path]:
    """Generated documents (text file) and a tokenizer trained on a part of them."""
    from corpora import documents, train_tokenizer, write_text

    docs = documents(int(mb * 850), seed=0)
    text = write_text(work / "docs.txt", docs)
    return text, train_tokenizer(work / "tokenizer.json", docs[:400], vocab_size=4000)


def synthetic_corpus(out: Path, n_tokens: int, vocab: int = 4000) -> Path:
    """A corpus of random tokens written directly in the prepared layout (no tokenizer needed)."""
    from distrain.corpus import FORMAT

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(out / "tokens.bin", "wb") as f:
        for start in range(0, n_tokens, 1 << 26):
            f.write(rng.integers(0, vocab, size=min(1 << 26, n_tokens - start), dtype=np.uint16).tobytes())
    np.save(out / "documents.npy", np.array([0, n_tokens], dtype=np.int64))
    manifest = {"format": FORMAT, "dtype": "uint16", "tokens": n_tokens, "documents": 1, "vocab_size": vocab,
                "eos_id": None, "text_field": "text", "tokenizer": {"path": "", "sha256": ""}, "sources": []}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


LOADER = """
from distrain.data.tokens import prepared_corpus
from distrain.data.sampler import ResumableSampler
from distrain.data.loader import StepLoader
train = prepared_corpus({path!r}, seq_len={seq})[0]
loader = StepLoader(train, ResumableSampler(len(train), {batch}, {batch}, 1, 0, 0), torch.device("cpu"), 0, 0, 0)
"""


def timed_loader(setup: str, warmup: int, steps: int, batch: int, seq: int) -> str:
    """A child process's script: `setup` makes `loader`; after `warmup` steps, the tokens per
    second of `steps` more, printed. One thread, as a training rank has."""
    return (f"import time, torch\ntorch.set_num_threads(1)\n{setup}\n"
            f"for _ in range({warmup}):\n    loader.next_step()\n"
            f"t0 = time.perf_counter()\nfor _ in range({steps}):\n    loader.next_step()\n"
            f"print(({steps} * {batch} * {seq}) / (time.perf_counter() - t0))\n")


def train_command(path: Path, run: Path, steps: int, seq: int = SEQ) -> list[str]:
    return ["--config", str(ROOT / "configs" / "gpt_tiny.yaml"), f"run.dir={run}", "data.name=tokens",
            f"data.path={path}", f"data.seq_len={seq}", f"data.global_batch_size={BATCH}", f"train.max_steps={steps}",
            "train.eval_every=0", "train.log_every=10", "log.progress=off", "checkpoint.resume=never",
            "data.eval_batch_size=8", "data.eval_fraction=0.000001"]


def bench_loader(work: Path, rounds: int) -> dict:
    corpus = synthetic_corpus(work / "loader-corpus", 50_000_000)
    loader, training = [], []
    for r in range(rounds):
        setup = LOADER.format(path=str(corpus), seq=SEQ, batch=BATCH)
        loader.append(float(python(timed_loader(setup, 20, 300, BATCH, SEQ))))
        run = work / f"train-{r}"
        subprocess.run([sys.executable, "-m", "distrain.train", *train_command(corpus, run, 40)], check=True,
                       capture_output=True, env=ENV, cwd=ROOT)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        training.append(statistics.median(x["tokens_per_s"] for x in rows if x["split"] == "train" and x["step"] > 10))
    ratios = [a / b for a, b in zip(loader, training)]
    return {"loader_tokens_per_s": spread(loader), "training_tokens_per_s": spread(training), "ratio": spread(ratios)}


ENCODE = """
import re, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file({tokenizer!r})
text = open({text!r}, encoding="utf-8").read()
t0 = time.perf_counter()
docs = [d for d in re.split(r"\\n{{2,}}", text) if d.strip()]
tok.encode_batch_fast(docs)
print(time.perf_counter() - t0)
"""


def bench_prepare(work: Path, rounds: int, mb: float) -> dict:
    """Whole commands, interpreter start included, by wall time and by CPU time (user + system
    of the process and its children): on a shared machine the wall time of a process says as
    much about the neighbours as about it, while the CPU seconds it needed per MB do not.
    `prepare --workers 1` encodes in its own process with the tokenizer's default threads;
    with more workers each process runs one thread."""
    text, tokenizer = make_corpus(work, mb)
    size_mb = text.stat().st_size / 2**20
    encode = [sys.executable, "-c", ENCODE.format(tokenizer=str(tokenizer), text=str(text))]
    prepare = [sys.executable, "-m", "distrain", "prepare", "--tokenizer", str(tokenizer), "--progress", "off",
               str(text), "--out"]
    one_thread = {**ENV, "TOKENIZERS_PARALLELISM": "false"}
    cases = {"encode_batch, 1 thread": lambda r: (encode, one_thread),
             "encode_batch, default threads": lambda r: (encode, ENV),
             "prepare, 1 process": lambda r: (prepare + [str(work / f"p1-{r}"), "--workers", "1"], ENV),
             "prepare, 2 processes": lambda r: (prepare + [str(work / f"p2-{r}"), "--workers", "2"], ENV)}
    wall: dict[str, list] = {name: [] for name in cases}
    cpu: dict[str, list] = {name: [] for name in cases}
    for r in range(rounds):
        for name, command in cases.items():
            seconds, cpu_seconds = _timed(*command(r))
            wall[name].append(size_mb / seconds)
            cpu[name].append(size_mb / cpu_seconds)
    out = {"MB": round(size_mb, 1), **{f"{k}: MB/s": spread(v) for k, v in wall.items()},
           **{f"{k}: MB per CPU second": spread(v) for k, v in cpu.items()}}
    for measure, values in (("wall", wall), ("CPU", cpu)):
        out[f"{measure}: prepare 1 process / encode_batch default threads"] = spread(
            [a / b for a, b in zip(values["prepare, 1 process"], values["encode_batch, default threads"])])
    out["wall: prepare 2 processes, per process / encode_batch 1 thread"] = spread(
        [a / 2 / b for a, b in zip(wall["prepare, 2 processes"], wall["encode_batch, 1 thread"])])
    out["CPU: prepare 2 processes / encode_batch 1 thread"] = spread(
        [a / b for a, b in zip(cpu["prepare, 2 processes"], cpu["encode_batch, 1 thread"])])
    return out


def _timed(command: list[str], env: dict) -> tuple[float, float]:
    import resource

    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)
    seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


RSS = """
import re, threading, time
from distrain.data.tokens import TokenWindows
if {no_release}:
    TokenWindows._release = lambda self, start: None
peak = {{"anon": 0, "mapped": 0}}

def sample():  # anonymous memory, and the token file's resident pages, every 100 ms
    while True:
        anon = int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
        mapped, inside = 0, False
        for line in open("/proc/self/smaps"):
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith("tokens.bin")
            elif inside and line.startswith("Rss:"):
                mapped += int(line.split()[1])
        peak["anon"], peak["mapped"] = max(peak["anon"], anon), max(peak["mapped"], mapped)
        time.sleep(0.1)

threading.Thread(target=sample, daemon=True).start()
from distrain.train import main
main({args!r})
print("PEAK", peak["anon"] / 1024, peak["mapped"] / 1024)
"""


def bench_rss(work: Path, rounds: int, gb: float) -> dict:
    """RSS split in its two parts that a corpus can grow: anonymous memory (the sampler's
    permutations, batches) and the token file's pages mapped into the process. The peak of
    the whole RSS (ru_maxrss) is useless here: how much of torch's 1 GB of shared libraries
    is resident varies by hundreds of MB between identical runs, with the page cache."""
    big = synthetic_corpus(work / "big", int(gb * 2**30) // 2)
    small = synthetic_corpus(work / "small", 2 * 2**20)
    cases = [("4 MB corpus", small, False), (f"{gb:g} GB corpus", big, False),
             (f"{gb:g} GB corpus, pages never released", big, True)]
    anon: dict[str, list] = {name: [] for name, _, _ in cases}
    mapped: dict[str, list] = {name: [] for name, _, _ in cases}
    for r in range(rounds):
        for name, path, no_release in cases:
            args = train_command(path, work / f"rss-{r}-{no_release}-{path.name}", 60)
            out = python(RSS.format(args=args, no_release=no_release)).split("PEAK")[-1].split()
            anon[name].append(float(out[0]))
            mapped[name].append(float(out[1]))
    base = anon["4 MB corpus"]
    result = {}
    for name in anon:
        result[f"{name}: peak anonymous MB"] = spread(anon[name])
        result[f"{name}: peak token file pages MB"] = spread(mapped[name])
        result[f"{name}: growth over 4 MB corpus MB"] = spread([a + m - b - mb for a, m, b, mb in zip(
            anon[name], mapped[name], base, mapped["4 MB corpus"])])
    windows = int(gb * 2**30) // 2 // SEQ
    result["sampler permutation (8 bytes per window) MB"] = round(8 * windows / 2**20, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", nargs="+", default=["loader", "prepare", "rss"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--prepare-mb", type=float, default=20.0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        for part in args.parts:
            if part == "loader":
                result = bench_loader(work, args.rounds)
            elif part == "prepare":
                result = bench_prepare(work, args.rounds, args.prepare_mb)
            else:
                result = bench_rss(work, args.rounds, args.gb)
            print(json.dumps({part: result}, indent=1), flush=True)


if __name__ == "__main__":
    main()
