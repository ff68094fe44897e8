"""`python -m distrain.train` and torchrun's workers, forked from one process that has imported
torch, distrain and the optional libraries once, instead of each process importing them again.

A rank gets the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR/PORT, TORCHELASTIC_RUN_ID, ...) and runs `distrain.train`'s own entry point, so the
code under test is the same; what torchrun's agent does is done here as it does it: when one
worker fails the others get SIGTERM, then SIGKILL after a grace period, and the launch reports
a failure (exit 1). Tests of launching itself (torchrun's agents, SLURM, Kubernetes, Ray, signals
to the launcher) start real launchers; `DISTRAIN_TESTS_TORCHRUN=1` sends every run through them.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import torch.multiprocessing as mp
from multiprocessing import forkserver
from multiprocessing.connection import wait

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GRACE_S = 30  # torchrun's own wait between SIGTERM and SIGKILL

_context = None


def _ctx():
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload([__name__.split(".")[-1], "warm_imports"])
        # the server takes its module path from the environment only (not this process's sys.path)
        saved = dict(os.environ)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])
        try:
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return _context


def _worker(args: list[str], env: dict, out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(file, fd)
        os.close(file)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from distrain.train import end_process, main

    try:
        code = main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    end_process(code)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(base: dict, rank: int, nproc: int, port: int, run_id: str) -> dict:
    if nproc == 0:
        return base
    return {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
            "ROLE_NAME": "default", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": "0",
            "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "False"}


def run(args: list[str], nproc: int, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """nproc=0: one lone process; otherwise nproc workers as torchrun --standalone starts them."""
    ctx = _ctx()
    port, run_id = _free_port(), uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        procs, files = [], []
        for rank in range(max(nproc, 1)):
            out, err = f"{tmp}/{rank}.out", f"{tmp}/{rank}.err"
            p = ctx.Process(target=_worker, args=(args, _worker_env(env, rank, nproc, port, run_id), out, err))
            p.start()
            procs.append(p)
            files.append((out, err))
        codes = _supervise(procs, time.monotonic() + timeout)
        stdout = "".join(Path(o).read_text(errors="replace") for o, _ in files if os.path.exists(o))
        stderr = "".join(Path(e).read_text(errors="replace") for _, e in files if os.path.exists(e))
    if codes is None:
        raise subprocess.TimeoutExpired(["distrain.train", *args], timeout, stdout, stderr)
    code = codes[0] if nproc == 0 else int(any(codes))
    if nproc and code:
        stderr += f"forked_ranks: worker exit codes {codes}\n"
    return subprocess.CompletedProcess(["distrain.train", *args], code, stdout, stderr)


def _supervise(procs, deadline: float):
    """Every worker's exit code, or None after the deadline (all killed); a failure stops the rest."""
    sentinels = {p.sentinel: p for p in procs}
    stopping_since = None
    while sentinels:
        now = time.monotonic()
        if now > deadline:
            _signal_all(procs, signal.SIGKILL)
            for p in procs:
                p.join()
            return None
        if stopping_since is not None and now - stopping_since > GRACE_S:
            _signal_all(procs, signal.SIGKILL)
        for s in wait(list(sentinels), timeout=0.5):
            p = sentinels.pop(s)
            p.join()
            if p.exitcode != 0 and stopping_since is None:
                stopping_since = time.monotonic()
                _signal_all(procs, signal.SIGTERM)
    return [p.exitcode for p in procs]


def _signal_all(procs, sig) -> None:
    for p in procs:
        if p.exitcode is None and p.pid is not None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass
