"""The sbatch templates in a real one-node SLURM cluster on localhost: torchrun inside srun,
one srun task per rank through distrain's SLURM detection, and preemption -> requeue -> exact resume."""
import subprocess
import time

import pytest

from conftest import CONFIGS, ROOT, final_weights, metrics, run_train
from slurm_cluster import SlurmCluster, wait_for
from test_launch import venv_env

ARGS = ["train.epochs=null", "train.log_every=50", "model.hidden=[32,32]", "strategy.name=ddp"]
CPU_TASKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-task=0", "--cpus-per-task=1"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(slurm, template, options, overrides, out):
    return slurm.sbatch([*options, f"--output={out}", f"--chdir={ROOT}", ROOT / "slurm" / template,
                         CONFIGS / "digits_mlp.yaml", *overrides], env=venv_env())


def test_templates_are_valid_bash():
    for script in [*(ROOT / "slurm").glob("*.sbatch"), *(ROOT / "launch").glob("*.sh")]:
        assert subprocess.run(["bash", "-n", script]).returncode == 0, script


def test_single_node_template_trains_the_demo_on_two_gloo_tasks(slurm, tmp_path):
    run = tmp_path / "run"
    job = submit(slurm, "single_node.sbatch", ["--gpus-per-node=0", "--cpus-per-task=2", "--export=ALL,NPROC=2"],
                 [f"run.dir={run}"], tmp_path / "job.out")
    state = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 240)
    assert state["JobState"] == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    assert "ddp on 2 process(es)" in (tmp_path / "job.out").read_text()
    assert metrics(run, "eval")[-1]["accuracy"] >= 0.95


def test_srun_task_per_rank_uses_slurm_detection(slurm, tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    overrides = [*ARGS, "train.max_steps=60", "checkpoint.every_steps=0"]
    job = submit(slurm, "multi_node_srun.sbatch", CPU_TASKS, [f"run.dir={run}", *overrides], tmp_path / "job.out")
    state = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 240)
    assert state["JobState"] == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    log0 = (run / "logs" / "rank0.log").read_text()
    assert "ddp on 2 process(es)" in log0 and (run / "logs" / "rank1.log").exists()
    run_train(["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={ref}", *overrides], nproc=2)
    a, b = final_weights(run), final_weights(ref)
    assert all(a[k].equal(b[k]) for k in a)


def test_preemption_checkpoints_requeues_and_resumes_exactly(slurm, tmp_path):
    run, ref, out = tmp_path / "run", tmp_path / "ref", tmp_path / "job.out"
    overrides = [*ARGS, "train.max_steps=1500", "checkpoint.every_steps=300"]
    job = submit(slurm, "preemptible.sbatch", CPU_TASKS, [f"run.dir={run}", *overrides], out)
    wait_for(lambda: (run / "metrics.jsonl").exists() and any(r["step"] >= 100 for r in metrics(run, "train")),
             180, "the run to pass step 100")
    slurm.run(["scancel", "--signal=USR1", job])  # what --signal=USR1@120 delivers before a time limit
    # the script requeues; SLURM holds a requeued job for a while, release it now
    wait_for(lambda: slurm.job(job).get("JobState") == "PENDING" and "start 1" in out.read_text(), 120,
             "the job to be requeued")
    # release only once the node has cleaned up the first run, and in a later second than the requeue:
    # slurmd compares credential and revocation times in whole seconds ("Job credential revoked")
    requeued_at = time.time()
    wait_for(lambda: time.time() >= requeued_at + 1.5
             and slurm.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip() == "idle", 120,
             "the node to be idle again")
    slurm.run(["scontrol", "update", f"jobid={job}", "StartTime=now"])
    state = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    text = out.read_text()
    assert state["JobState"] == "COMPLETED", text[-3000:] + str(state)
    assert state.get("Restarts") == "1" and "start 2" in text
    assert "preemption signal: checkpointing at step" in text and "resumed from" in text
    steps = [r["step"] for r in metrics(run, "train")]
    assert steps[-1] == 1500
    run_train(["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={ref}", *overrides], nproc=2)
    a, b = final_weights(run), final_weights(ref)
    assert all(a[k].equal(b[k]) for k in a), "the preempted and requeued run must equal an uninterrupted one"
