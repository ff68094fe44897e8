"""A disk that fills up during a run: the checkpoint that no longer fits stops every rank with exit 1
and one line naming the path, the cause and the bytes needed and free; the partial copy is removed,
`latest` and the committed checkpoints stay as they were, and once space is freed the same command
resumes and ends bitwise equal to an uninterrupted run.

The run directory lies on a small tmpfs the test mounts (it runs as root, as CI does). While the run
waits at a gate (tests/gates.py), the test fills that filesystem to the last byte with a ballast file:
either right after the first checkpoint (the next one is then refused before anything is written), or
in the middle of writing a checkpoint (a real ENOSPC from the kernel inside torch's writer)."""
import errno
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONFIGS, ROOT, clean_env, extended, final_weights, run_train
from gates import open_gate, wait_for_gate

STEPS, EVERY = 24, 8
STRATEGIES = {
    "single": (0, ["strategy.name=single"]),
    "ddp": (2, ["strategy.name=ddp"]),
    "fsdp": (2, ["strategy.name=fsdp"]),
    "zero2": (2, ["strategy.name=deepspeed", "strategy.zero_stage=2"]),
    "fsdp_async": (2, ["strategy.name=fsdp", "checkpoint.async_save=true"]),  # fails when the save is committed
}
# (strategy, where the disk fills up): every strategy fails inside a write, two are refused before one
CASES = [("single", "writing"), ("ddp", "writing"), ("fsdp", "writing"), ("zero2", "writing"),
         ("fsdp_async", "writing"), ("single", "before"), ("fsdp", "before")]


def args_for(run, strategy, **gate):
    return ["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={run}", "model.name=tests.gates:gated_mlp",
            "model.hidden=[128,128]", "train.epochs=null", f"train.max_steps={STEPS}", "train.eval_every=10",
            f"checkpoint.every_steps={EVERY}", "train.log_every=5", "data.global_batch_size=64",
            "data.micro_batch_size=16", "optim.lr=0.01", *strategy, *[f"model.{k}={v}" for k, v in gate.items()]]


def launcher(nproc):
    if nproc == 0:
        return [sys.executable, "-m", "distrain.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "distrain.train"]


@pytest.fixture
def small_fs(tmp_path):
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"these tests mount a small tmpfs and need root: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    cache = {}

    def get(name):
        name = name.removesuffix("_async")  # writing in the background does not change the optimization
        if name not in cache:
            nproc, strategy = STRATEGIES[name]
            run = tmp_path_factory.mktemp(f"ref-{name}") / "run"
            run_train(args_for(run, strategy), nproc=nproc)
            cache[name] = final_weights(run)
        return cache[name]
    return get


def fill(fs: Path) -> Path:
    """Write a ballast file until the filesystem refuses another byte."""
    ballast = fs / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return ballast


def committed(checkpoints: Path) -> dict:
    """Every byte of the committed checkpoints and of `latest`."""
    files = [p for p in sorted(checkpoints.rglob("*")) if p.is_file()]
    return {str(p.relative_to(checkpoints)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files if not p.relative_to(checkpoints).parts[0].startswith(".")}


@pytest.mark.parametrize("name, where", extended(CASES, {("fsdp", "writing"), ("ddp", "writing"), ("fsdp", "before"),
                                                  ("fsdp_async", "writing")}),
                         ids=[f"{n}-{w}" for n, w in CASES])
def test_disk_full_during_a_checkpoint_stops_cleanly_and_resumes_exactly(name, where, small_fs, references, tmp_path):
    nproc, strategy = STRATEGIES[name]
    accumulation = 4 if nproc == 0 else 2
    run, fifo = small_fs / "run", tmp_path / "gate"
    os.mkfifo(fifo)
    # "writing": the checkpoint of step 16 waits as it starts writing the model's files;
    # "before": the first forward after the checkpoint of step 8 waits, so step 16 finds the disk full
    gate = {"on_save_after": 16 * accumulation} if where == "writing" else {"at_forward": 8 * accumulation}
    args = args_for(run, strategy, fifo=fifo, **gate)
    with open(tmp_path / "stderr", "w+") as err:
        proc = subprocess.Popen(launcher(nproc) + [str(a) for a in args], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=clean_env(), cwd=ROOT)
        try:
            wait_for_gate(proc)
            before = committed(run / "checkpoints")
            ballast = fill(small_fs)
            open_gate(fifo)
            out = proc.stdout.read()
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
        err.seek(0)
        stderr = err.read()
    assert code == 1 if nproc == 0 else code != 0, out[-2000:] + stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if "training stopped on rank" in line]
    first = next((line for line in stopped if "on rank 0:" in line), stderr[-3000:])
    numbers = re.search(r"needs about (\d+) bytes .*free: (\d+) bytes", first)
    assert str(run / "checkpoints" / ".tmp-step_00000016") in first and numbers, stderr[-3000:]
    assert int(numbers[1]) > int(numbers[2])
    assert ("No space left on device" if where == "writing" else "not enough space, nothing written") in first
    assert all(any(f"on rank {r}:" in line for line in stopped) for r in range(max(nproc, 1))), stderr[-3000:]
    assert "Logging error" not in stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert committed(run / "checkpoints") == before
    assert (run / "checkpoints" / "latest").read_text() == "step_00000008\n"

    ballast.unlink()  # space freed: the very same command goes on from the last committed checkpoint
    second = run_train(args, nproc=nproc)
    assert "resumed from" in second.stdout and "step_00000008" in second.stdout
    ours, ref = final_weights(run), references(name)
    assert all(ours[k].equal(ref[k]) for k in ref), f"{name}/{where}: weights differ from the uninterrupted run"


def test_logs_and_metrics_that_cannot_be_written_warn_once_and_the_run_goes_on(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    for name in ("logs/rank0.log", "metrics.jsonl"):  # every write to /dev/full fails with ENOSPC
        (run / name).symlink_to("/dev/full")
    done = run_train(["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={run}", "train.epochs=null",
                      "train.max_steps=12", "train.log_every=2", "train.eval_every=4", "strategy.name=single"])
    assert done.stderr.count("cannot write the log file") == 1, done.stderr
    assert done.stderr.count("cannot write metrics") == 1, done.stderr
    assert "No space left on device" in done.stderr
    assert "Logging error" not in done.stderr and "Traceback" not in done.stderr
    assert "step 12/12" in done.stdout  # the console still has every line
    assert (run / "final" / "model.pt").exists()


def test_storage_failures_are_told_from_other_errors(tmp_path):
    import traceback

    from torch.distributed.checkpoint import CheckpointException

    from distrain.checkpoint_io import storage_failure

    quota = storage_failure(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), tmp_path, 100)
    assert f"cannot write checkpoint {tmp_path}: Disk quota exceeded (needs about 100 bytes" in str(quota)
    try:  # what torch's zip writer raises on a short write: no errno, the free space decides
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5041728 vs 5041620")
    except RuntimeError as e:
        short_write = e
    assert "No space left on device" in str(storage_failure(short_write, tmp_path, 1 << 60))
    assert "unexpected pos" in str(storage_failure(short_write, tmp_path, 1))  # space left: told as it was
    eio = OSError(errno.EIO, os.strerror(errno.EIO))
    gathered = CheckpointException("save failed", {1: (eio, traceback.StackSummary())})
    assert "Input/output error" in str(storage_failure(gathered, tmp_path, 1))  # another rank's, through DCP
    assert storage_failure(ValueError("a bug"), tmp_path, 1) is None
    assert storage_failure(OSError(errno.EACCES, "Permission denied"), tmp_path, 1) is None


def test_a_start_warns_when_the_next_checkpoint_will_not_fit(tmp_path):
    from distrain.rundir import space_warning

    newest = tmp_path / "checkpoints" / "step_00000008"
    newest.mkdir(parents=True)
    (newest / "manifest.json").write_text('{"model.pt": 1000}')
    assert space_warning(tmp_path / "checkpoints") is None
    (newest / "manifest.json").write_text(f'{{"model.pt": {1 << 62}}}')  # more than any disk here holds
    assert f"a checkpoint takes about {1 << 62}: the next checkpoint will stop the run" in space_warning(
        tmp_path / "checkpoints")
