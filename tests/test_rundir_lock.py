"""One launch per run directory: a second launch on a directory in use exits 2 naming the holder and
leaves the first run exactly as it would be alone; a holder that was SIGKILLed leaves nothing in the
way; a holder that is still exiting is waited for (run.lock_wait_s). Leftovers of interrupted saves
are removed at the next start."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import CONFIGS, ROOT, clean_env, final_weights, metrics, run_train
from gates import open_gate, wait_for_gate

STEPS = 20


def args_for(run, *extra, **gate):
    return ["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={run}", "model.name=tests.gates:gated_mlp",
            "train.epochs=null", f"train.max_steps={STEPS}", "train.eval_every=5", "checkpoint.every_steps=8",
            "train.log_every=2", "strategy.name=single", *extra, *[f"model.{k}={v}" for k, v in gate.items()]]


def start(args, stderr):
    return subprocess.Popen([sys.executable, "-m", "distrain.train"] + [str(a) for a in args], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=clean_env(), cwd=ROOT)


def rows(run):
    return [(r["step"], r["split"], r["loss"]) for r in metrics(run)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    run_train(args_for(run))
    return final_weights(run), rows(run)


@pytest.fixture
def holder(tmp_path):
    """A first launch, stopped at a gate in its 9th step (one forward per step) while it holds the run directory."""
    run, fifo = tmp_path / "run", tmp_path / "gate"
    os.mkfifo(fifo)
    with open(tmp_path / "holder.err", "w+") as err:
        proc = start(args_for(run, fifo=fifo, at_forward=8), err)
        try:
            wait_for_gate(proc)
            yield proc, run, fifo
        finally:
            proc.kill()
            proc.wait()


def test_a_second_launch_exits_2_naming_the_holder_and_the_first_ends_as_it_would_alone(holder, reference):
    proc, run, fifo = holder
    log_before = (run / "logs" / "rank0.log").read_text()
    second = run_train(args_for(run, "run.lock_wait_s=0"), check=False)
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
    assert f"config key 'run.dir': {run} is in use by process {proc.pid} on host " in second.stderr
    assert "(started 20" in second.stderr
    # two ranks follow their rank 0: refused too, and nothing of theirs lands in the holder's directory
    pair = run_train(args_for(run, "run.lock_wait_s=0", "strategy.name=ddp"), nproc=2, check=False)
    assert pair.returncode != 0 and pair.stderr.count(f"is in use by process {proc.pid}") == 1, pair.stderr
    assert not (run / "logs" / "rank1.log").exists()
    assert (run / "logs" / "rank0.log").read_text().startswith(log_before)
    assert "is in use" not in (run / "logs" / "rank0.log").read_text()

    open_gate(fifo)
    out = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, out[-2000:]
    weights, metric_rows = reference
    ours = final_weights(run)
    assert all(ours[k].equal(weights[k]) for k in weights)
    assert rows(run) == metric_rows  # no row of another launch, none twice


def test_a_launch_right_after_the_holder_was_sigkilled_proceeds(holder, reference):
    proc, run, fifo = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fifo.unlink()  # the same command runs straight through
    second = run_train(args_for(run, "run.lock_wait_s=0", fifo=fifo, at_forward=8))
    assert "resumed from" in second.stdout and "step_00000008" in second.stdout
    weights, _ = reference
    ours = final_weights(run)
    assert all(ours[k].equal(weights[k]) for k in weights)


def test_a_launch_waits_for_a_holder_that_is_exiting_then_proceeds(holder, reference, tmp_path):
    proc, run, fifo = holder
    with open(tmp_path / "second.err", "w+") as err:
        second = start(args_for(run, "run.lock_wait_s=100", fifo=fifo, at_forward=8), err)
        try:
            waiting = next(line for line in second.stdout if "waiting up to" in line)
            assert f"{run} is in use by process {proc.pid}" in waiting and "waiting up to 100 s" in waiting
            open_gate(fifo)  # the holder finishes its run and exits
            assert proc.wait(timeout=120) == 0
            out = second.stdout.read()
            assert second.wait(timeout=120) == 0, out[-2000:]
        finally:
            second.kill()
    assert f"resumed from {run / 'checkpoints' / f'step_{STEPS:08d}'}" in out
    weights, _ = reference
    ours = final_weights(run)
    assert all(ours[k].equal(weights[k]) for k in weights)


def test_what_interrupted_saves_left_is_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    args = ["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={run}", "model.name=tests.faults:killable_mlp",
            "train.epochs=null", "train.max_steps=12", "checkpoint.every_steps=4", "strategy.name=single",
            f"model.marker={tmp_path / 'killed'}", "model.kill_on_save_after=8"]
    assert run_train(args, check=False).returncode != 0  # SIGKILLed inside the checkpoint of step 8
    ckpts = run / "checkpoints"
    assert (ckpts / ".tmp-step_00000008").is_dir() and (ckpts / "latest").read_text() == "step_00000004\n"
    (ckpts / ".retired-step_00000002").mkdir()  # as a kill during retention leaves it
    again = run_train(args + ["checkpoint.every_steps=0"])  # no checkpoint of step 8 to overwrite the leftover
    assert "removed what interrupted saves left in" in again.stdout
    assert ".retired-step_00000002, .tmp-step_00000008" in again.stdout
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000004", "step_00000012"]


def test_where_file_locks_do_not_work_a_lock_file_with_a_checked_owner_stands_in(tmp_path, monkeypatch):
    from distrain.rundir import RunDirInUse, RunDirLock

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = RunDirLock.acquire(tmp_path, wait_s=0)
    assert "file locks do not work" in lock.notes[0]
    with pytest.raises(RunDirInUse, match=f"process {os.getpid()} on host"):
        RunDirLock.acquire(tmp_path, wait_s=0)  # its owner is alive
    lock.release()
    assert not (tmp_path / ".lock-file").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    (tmp_path / ".lock-file").write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout)}))
    RunDirLock.acquire(tmp_path, wait_s=0).release()  # a dead owner's file is taken over


def test_a_lock_held_in_this_process_refuses_a_second_holder(tmp_path):
    from distrain.rundir import RunDirInUse, RunDirLock

    lock = RunDirLock.acquire(tmp_path, wait_s=0)
    with pytest.raises(RunDirInUse, match=f"process {os.getpid()}"):
        RunDirLock.acquire(tmp_path, wait_s=0)
    lock.release()
    RunDirLock.acquire(tmp_path, wait_s=0).release()
