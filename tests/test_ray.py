"""distrain under Ray Train's TorchTrainer on a local Ray cluster of two node processes (a head and a
second node, one CPU each, on loopback): 2 gloo workers match torchrun with 2 processes; a worker
SIGKILLed mid-run makes Ray restart the group, which resumes bitwise; a restart on 1 worker resumes
on world size 1 with every sample of the epoch seen once; bad input exits 2 with one line."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONFIGS, EXTENDED, ROOT, clean_env, final_weights, max_abs_diff, run_train

# Loopback. Ray replaces 127.0.0.1 itself by the machine's outward address; the rest of 127/8 it keeps.
IP = "127.0.0.2"
TRAIN = ["train.epochs=null", "train.max_steps=40", "train.log_every=10", "checkpoint.every_steps=10",
         "model.name=tests.faults:killable_mlp", "model.hidden=[32,32]", "strategy.name=ddp"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((IP, 0))
        return s.getsockname()[1]


def stop(node: subprocess.Popen) -> None:
    """A `ray start --block` and the processes it started, in the session it leads (SIGTERM would
    drain for 30 s); its workers end with their raylet."""
    os.killpg(node.pid, signal.SIGKILL)
    node.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray

    temp, port = tmp_path_factory.mktemp("ray"), free_port()
    env = clean_env(GLOO_SOCKET_IFNAME="lo", PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    ray_start = [str(Path(sys.executable).parent / "ray"), "start", "--block", f"--node-ip-address={IP}",
                 "--num-cpus=1", "--disable-usage-stats"]
    log = open(temp / "nodes.log", "w")

    def start(*args):  # in a session of its own, to be stopped with everything it started
        return subprocess.Popen([*ray_start, *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    nodes = [start("--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}")]
    try:
        ray.init(address=f"{IP}:{port}", _node_ip_address=IP, logging_level="WARNING", log_to_driver=False)
        # Ray Train waits for the second node's CPU when it places the workers
        nodes.append(start(f"--address={IP}:{port}"))
        yield temp
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            stop(node)
        log.close()


def ray_fit(cluster, run, overrides, workers=2, max_failures=0):
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from distrain.integrations.ray import fit

    return fit(CONFIGS / "digits_mlp.yaml", [*TRAIN, f"run.dir={run}", *overrides], ScalingConfig(num_workers=workers),
               RunConfig(storage_path=str(cluster / "results"), name=run.parent.name,
                         failure_config=FailureConfig(max_failures=max_failures)))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    return run, ray_fit(cluster, run, [])


def test_two_ray_workers_match_torchrun_and_report_the_checkpoint(uninterrupted, tmp_path):
    run, result = uninterrupted
    assert "ddp on 2 process(es) (ray), cpu/gloo" in (run / "logs" / "rank0.log").read_text()
    reference = tmp_path / "torchrun"
    run_train(["--config", CONFIGS / "digits_mlp.yaml", *TRAIN, f"run.dir={reference}"], nproc=2)
    assert max_abs_diff(final_weights(run), final_weights(reference)) <= 1e-6
    assert result.metrics["checkpoint"] == str(run / "checkpoints" / "step_00000040")
    reported = Path(result.checkpoint.path)  # Ray's copy in its storage: distrain's checkpoint files
    assert sorted(p.name for p in reported.iterdir()) == \
        sorted(p.name for p in (run / "checkpoints" / "step_00000040").iterdir())


def test_a_killed_worker_restarts_the_group_which_resumes_bitwise(cluster, uninterrupted, tmp_path):
    run = cluster / "results" / "killed" / "run"  # inside Ray's storage: the checkpoint is reported where it is
    kill = ["model.kill_at=25", "model.kill_rank=1", f"model.marker={tmp_path / 'killed'}"]  # SIGKILL at step 26
    result = ray_fit(cluster, run, kill, max_failures=1)
    assert Path(result.checkpoint.path) == run / "checkpoints" / "step_00000040"
    assert (tmp_path / "killed.rank1").exists()
    assert "resumed from" in (run / "logs" / "rank0.log").read_text()
    assert "step_00000020" in (run / "logs" / "rank0.log").read_text().split("resumed from", 1)[1][:200]
    ours, theirs = final_weights(run), final_weights(uninterrupted[0])
    assert all(ours[k].equal(theirs[k]) for k in theirs)


@EXTENDED
def test_a_restart_on_one_worker_resumes_on_world_size_1_seeing_every_sample_once(cluster, tmp_path):
    run, record = tmp_path / "run", tmp_path / "record"
    epoch = ["data.name=tests.faults:indexed_digits", "data.n_train=384", "train.max_steps=6",  # 6 steps = 1 epoch
             "checkpoint.every_steps=2", "train.eval_every=100", f"model.record={record}"]
    kill = ["model.kill_at=4", "model.kill_rank=1", f"model.marker={tmp_path / 'killed'}"]  # SIGKILL in step 5
    with pytest.raises(Exception):  # rank 1 killed in step 5 and no restart allowed: the fit fails
        ray_fit(cluster, run, [*epoch, *kill])
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    ray_fit(cluster, run, [*epoch, *kill], workers=1)  # the same command on fewer workers
    log = (run / "logs" / "rank0.log").read_text()
    assert "ddp on 1 process(es) (ray)" in log and "step_00000004 at step 4" in log
    # a line per forward: steps 1-4 on 2 ranks (32 samples each), then steps 5-6 on 1 rank (64 each); rank 0
    # may have recorded its step 5 of the first fit, which the checkpoint does not count
    rows = {r: [line.split() for line in Path(f"{record}.rank{r}").read_text().splitlines()] for r in (0, 1)}
    before = [row for r in (0, 1) for row in [row for row in rows[r] if len(row) == 32][:4]]
    after = [row for row in rows[0] if len(row) == 64]
    assert len(after) == 2
    seen = sorted(int(i) for row in before + after for i in row)
    assert seen == list(range(384))


def test_a_world_size_that_does_not_split_the_batch_exits_2_with_one_line():
    command = [sys.executable, "-m", "distrain.ray", "--config", CONFIGS / "digits_mlp.yaml", "--workers", "3"]
    proc = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "distrain: error: config key 'data.global_batch_size': 64 is not divisible by the world size 3"]


def test_without_ray_installed_exits_2_naming_the_extra():
    code = ("import sys; sys.modules['ray'] = None; from distrain.ray import main; "
            f"sys.exit(main(['--config', {str(CONFIGS / 'digits_mlp.yaml')!r}, '--workers', '2']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install distrain[ray]" in lines[0]
