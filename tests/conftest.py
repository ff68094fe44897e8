"""Shared test helpers: running distrain in-process, and under a real torchrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forked_ranks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CLUSTER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_JOB_ID", "SLURM_NTASKS")

torch.set_num_threads(1)
# what every launched process runs with, set before the process that forks them starts
os.environ.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

# The rest of a test matrix whose default cases already cover every strategy and code path
# (another kill point, another loss source on a strategy checked with one): `pytest --extended`.
EXTENDED = pytest.mark.extended


def pytest_addoption(parser):
    parser.addoption("--extended", action="store_true", help="also run the extended matrix cases")


def pytest_configure(config):
    config.addinivalue_line("markers", "extended: a further case of a matrix; run with --extended")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--extended"):
        return
    skip = pytest.mark.skip(reason="extended matrix case: pytest --extended")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


def extended(cases: list, chosen) -> list:
    """cases, those in `chosen` marked extended."""
    values = [c if isinstance(c, tuple) else (c,) for c in cases]
    return [pytest.param(*v, marks=EXTENDED if c in chosen else ()) for c, v in zip(cases, values)]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", **extra)
    return env


def run_train(args: list[str], nproc: int = 0, timeout: int = 120, check: bool = True, torchrun: bool = False,
              **popen) -> subprocess.CompletedProcess:
    """nproc=0: `python -m distrain.train`; otherwise `torchrun --standalone --nproc_per_node=nproc`.

    Forked from one warm process (tests/forked_ranks.py), unless `torchrun` (or popen arguments)
    asks for the real launchers, as DISTRAIN_TESTS_TORCHRUN=1 does for every run."""
    args = [str(a) for a in args]
    if torchrun or popen or os.environ.get("DISTRAIN_TESTS_TORCHRUN"):
        launcher = [sys.executable, "-m", "distrain.train"] if nproc == 0 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "distrain.train"]
        proc = subprocess.run(launcher + args, capture_output=True, text=True, timeout=timeout, env=clean_env(),
                              cwd=ROOT, **popen)
    else:
        proc = forked_ranks.run(args, nproc, clean_env(), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def train_inprocess(args: list[str]) -> int:
    from distrain.train import main

    return main([str(a) for a in args])


def final_weights(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "final" / "model.pt", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def metrics(run_dir: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


@pytest.fixture
def digits_args(tmp_path):
    return ["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={tmp_path / 'run'}"]
