"""What the GPU scripts share (bench/gpu.py, bench/gpu_checks.py): the data the runs load by
import path, launching a run with a log and a deadline, and reading its results."""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = str(ROOT / "configs" / "digits_mlp.yaml")
BARE = ""  # main() writes a config with no model section here, for the GPT and ResNet runs
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
       "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
DEADLINE = [float("inf")]  # time.monotonic() after which no run starts and running ones are stopped


# data and models the runs load by import path ------------------------------------------------

def tokens(n_train: int = 64, n_eval: int = 8, seq_len: int = 1024, vocab_size: int = 50304, seed: int = 0):
    """Random token windows, already on the GPU when there is one (the LM cases measure the model)."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    t = torch.randint(vocab_size, (n_train + n_eval, seq_len + 1), generator=g)
    t = t.cuda() if torch.cuda.is_available() else t
    x, y = t[:, :-1], t[:, 1:]
    meta = {"task": "lm", "vocab_size": vocab_size, "seq_len": seq_len}
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]), meta


def images(n_train: int = 4096, n_eval: int = 256, seed: int = 0):
    """CIFAR-shaped random images and labels on the GPU."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_train + n_eval, 3, 32, 32, generator=g), torch.randint(10, (n_train + n_eval,), generator=g)
    if torch.cuda.is_available():
        x, y = x.cuda(), y.cuda()
    meta = {"task": "classification", "in_shape": (3, 32, 32), "num_classes": 10}
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]), meta


# running distrain -----------------------------------------------------------------------------

def launch(args: list, nproc: int, log: Path, timeout: int = 150) -> int:
    """distrain.train under torchrun (nproc >= 1) or as a plain process (nproc 0); output to `log`."""
    cmd = [sys.executable, "-m", "distrain.train"] if nproc == 0 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "distrain.train"]
    timeout = min(timeout, DEADLINE[0] - time.monotonic())
    with open(log, "a") as f:
        f.write(" ".join(map(str, cmd + args)) + "\n")
        if timeout <= 0:
            f.write("not started: out of time\n")
            return -1
        f.flush()
        try:
            return subprocess.run(cmd + [str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            f.write(f"timed out after {timeout} s\n")
            return -1


def rows(run: Path, split: str = "train") -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def weights(run: Path):
    import torch

    path = run / "final" / "model.pt"
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def max_diff(a: dict, b: dict) -> float:
    if a is None or b is None or a.keys() != b.keys():
        return float("inf")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def device_of(log: Path) -> str:
    """The 'cuda:0/nccl' part of distrain's start-up line."""
    for line in log.read_text().splitlines():
        if "distrain:" in line and " process(es), " in line:
            return line.split(" process(es), ")[1].split(",")[0]
    return "?"


def pool(jobs: dict, workers: int) -> dict:
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        futures = {name: ex.submit(fn) for name, fn in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


