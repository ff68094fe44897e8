"""Cluster detection from faked environments."""
import pytest

from distrain.cluster import detect, expand_nodelist, slurm_port


def test_single_process_by_default():
    env = detect({})
    assert (env.kind, env.rank, env.world_size, env.distributed) == ("single", 0, 1, False)


def test_torchrun():
    env = detect({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
                  "MASTER_ADDR": "node7", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x",
                  "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (env.kind, env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == \
        ("torchrun", 5, 1, 8, 4, 1)
    assert (env.master_addr, env.master_port, env.restart_count, env.is_main) == ("node7", 1234, 2, False)


def test_torchrun_wins_inside_slurm():
    env = detect({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x",
                  "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77"})
    assert env.kind == "torchrun" and env.world_size == 2 and env.job_id == "77"


def test_srun_task():
    env = detect({"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NODEID": "1",
                  "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-03,07],cpu5",
                  "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_RESTART_COUNT": "1"})
    assert (env.kind, env.rank, env.local_rank, env.world_size, env.local_world_size, env.node_rank) == \
        ("slurm", 3, 1, 4, 2, 1)
    assert env.master_addr == "gpu01"
    assert env.master_port == slurm_port("4242") and 15000 <= env.master_port < 35000
    assert env.restart_count == 1 and env.job_id == "4242"


def test_srun_task_respects_explicit_master():
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "9",
                  "SLURM_JOB_NODELIST": "a1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 4000)


def test_batch_script_without_srun_is_one_process():
    # inside an sbatch script but not an srun step: SLURM vars exist, yet this is one process
    env = detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-2]"})
    assert env.kind == "single" and env.world_size == 1 and env.job_id == "9"


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node1", ["node1"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("a[001-002],b[1],c", ["a001", "a002", "b1", "c"]),
    ("rack1-n[09-10]", ["rack1-n09", "rack1-n10"]),
])
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_port_is_stable_per_job_and_differs_between_jobs():
    assert slurm_port("123") == slurm_port("123") != slurm_port("124")
