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


# The variables each platform sets in its pods or nodes, as their operators write them.
TRAINJOB = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "1", "JOB_COMPLETION_INDEX": "1",
            "PET_MASTER_ADDR": "distrain-node-0-0.distrain", "PET_MASTER_PORT": "29400"}
PYTORCHJOB = {"PET_NNODES": "3", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "2", "RANK": "2", "WORLD_SIZE": "3",
              "MASTER_ADDR": "distrain-master-0", "MASTER_PORT": "23456"}
INDEXED_JOB = {"JOB_COMPLETION_INDEX": "1", "NNODES": "2", "MASTER_ADDR": "distrain-0.distrain", "MASTER_PORT": "29400"}
SKYPILOT = {"SKYPILOT_NODE_RANK": "1", "SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6",
            "SKYPILOT_NUM_GPUS_PER_NODE": "1"}


@pytest.mark.parametrize("variables, platform, rank, world_size, master", [
    (TRAINJOB, "kubeflow", 1, 2, ("distrain-node-0-0.distrain", 29400)),
    (PYTORCHJOB, "pytorchjob", 2, 3, ("distrain-master-0", 23456)),
    (INDEXED_JOB, "indexed-job", 1, 2, ("distrain-0.distrain", 29400)),
    (SKYPILOT, "skypilot", 1, 2, ("10.0.0.5", 29500)),
])
def test_one_process_per_node_started_by_a_platform(variables, platform, rank, world_size, master):
    env = detect(variables)
    assert (env.platform, env.kind, env.rank, env.world_size, env.node_rank, env.local_rank) == \
        (platform, "torchrun", rank, world_size, rank, 0)
    assert (env.master_addr, env.master_port) == master and env.distributed


@pytest.mark.parametrize("variables, platform", [
    (TRAINJOB, "kubeflow"), (PYTORCHJOB, "pytorchjob"), (INDEXED_JOB, "indexed-job"), (SKYPILOT, "skypilot"),
    ({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}, "slurm"), ({}, "torchrun"),
])
def test_torchrun_in_front_of_a_platform_keeps_its_ranks_and_names_the_platform(variables, platform):
    # torchrun sets the worker's own variables and passes the platform's on
    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
    env = detect({**variables, **torchrun})
    assert (env.platform, env.kind, env.rank, env.local_rank, env.world_size) == (platform, "torchrun", 3, 1, 4)


@pytest.mark.parametrize("variables", [
    {**TRAINJOB, "PET_NPROC_PER_NODE": "4"}, {**PYTORCHJOB, "PET_NNODES": "1:3"},
    {**INDEXED_JOB, "NPROC_PER_NODE": "8"}, {**SKYPILOT, "SKYPILOT_NUM_GPUS_PER_NODE": "8"},
])
def test_several_processes_per_node_are_not_taken_for_one(variables):
    # those need torchrun in front (as the manifests run it): a lone process is not rank `node_rank`
    env = detect(variables)
    assert (env.kind, env.world_size, env.rank) == ("single", 1, 0)


def test_platform_of_a_plain_process_is_single():
    assert detect({}).platform == "single"
    assert detect({"SLURM_JOB_ID": "9"}).platform == "slurm"
