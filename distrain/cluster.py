"""Where this process sits in the job: the only module that reads os.environ.

Detection order: torchrun/torchelastic (it can run inside SLURM, so it wins), then a
task started directly by `srun`, then one process per node started directly by a
platform (Kubeflow TrainJob or PyTorchJob, a Kubernetes Indexed Job, SkyPilot), then a
single local process. Separately, `platform` names where the job runs, whichever
launcher started the process: it is what the first log line reports.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class ClusterEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    # how the processes meet: "torchrun" (a TCPStore at master_addr:master_port, rank 0's unless
    # torchrun's agent hosts it; also one process per node started directly by a platform),
    # "slurm", "ray" (Ray Train made the process group), or "single"
    kind: str = "single"
    platform: str = "single"  # kubeflow | pytorchjob | indexed-job | skypilot | ray | slurm | torchrun | single
    restart_count: int = 0  # torchelastic restarts or SLURM requeues
    job_id: str | None = None
    agent_store: bool = False  # torchrun's agent hosts the rendezvous store (else rank 0 does)
    interactive: bool = False  # stdout is a terminal

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.kind != "single"


def detect(environ: Mapping[str, str] | None = None) -> ClusterEnv:
    env = os.environ if environ is None else environ
    common = dict(interactive=os.isatty(1) if environ is None else False, platform=platform_of(env))
    if "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env and "LOCAL_RANK" in env):
        return ClusterEnv(
            rank=int(env["RANK"]),
            local_rank=int(env["LOCAL_RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            node_rank=int(env.get("GROUP_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            kind="torchrun",
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            job_id=env.get("SLURM_JOB_ID"),
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
            **common,
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of an srun step
        job_id = env.get("SLURM_JOB_ID", "0")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        world_size = int(env.get("SLURM_NTASKS", 1))
        nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0].split(",")[0]
        return ClusterEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=world_size,
            local_world_size=int(per_node) if per_node.isdigit() else max(world_size // nnodes, 1),
            node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=int(env.get("MASTER_PORT") or slurm_port(job_id)),
            kind="slurm",
            restart_count=int(env.get("SLURM_RESTART_COUNT", 0)),
            job_id=job_id,
            **common,
        )
    direct = _one_process_per_node(env, common["platform"])
    if direct is not None:
        rank, world_size, master_addr, master_port = direct
        return ClusterEnv(rank=rank, world_size=world_size, node_rank=rank, master_addr=master_addr,
                          master_port=master_port, kind="torchrun", **common)
    return ClusterEnv(job_id=env.get("SLURM_JOB_ID"), **common)


def platform_of(env: Mapping[str, str]) -> str:
    """Where the job runs, from the variables each platform sets in its processes (torchrun passes
    them on to its workers). Kubeflow Trainer's TrainJob runs its nodes as an Indexed Job (through a
    JobSet) and sets PET_*; the older PyTorchJob sets PET_* on plain pods."""
    if "PET_NNODES" in env or "PET_NODE_RANK" in env:
        return "kubeflow" if "JOB_COMPLETION_INDEX" in env else "pytorchjob"
    if "JOB_COMPLETION_INDEX" in env:
        return "indexed-job"
    if "SKYPILOT_NODE_RANK" in env:
        return "skypilot"
    if "SLURM_JOB_ID" in env:
        return "slurm"
    if "TORCHELASTIC_RUN_ID" in env or "RANK" in env:
        return "torchrun"
    return "single"


def _one_process_per_node(env: Mapping[str, str], platform: str) -> tuple[int, int, str, int] | None:
    """(rank, world size, master address, master port) of a process a platform started directly,
    one per node, with no torchrun in front; None where that is not what happened. More processes
    per node need torchrun, which the platforms' manifests run."""
    if platform in ("kubeflow", "pytorchjob"):
        if env.get("PET_NPROC_PER_NODE", "1") != "1" or not env.get("PET_NNODES", "").isdigit():
            return None
        return (int(env.get("PET_NODE_RANK") or env.get("RANK") or 0), int(env["PET_NNODES"]),
                env.get("PET_MASTER_ADDR") or env.get("MASTER_ADDR", "127.0.0.1"),
                int(env.get("PET_MASTER_PORT") or env.get("MASTER_PORT") or 29500))
    if platform == "indexed-job":  # the manifest names the nodes and the first pod's address
        if env.get("NPROC_PER_NODE", "1") != "1" or "NNODES" not in env:
            return None
        return (int(env["JOB_COMPLETION_INDEX"]), int(env["NNODES"]), env.get("MASTER_ADDR", "127.0.0.1"),
                int(env.get("MASTER_PORT") or 29500))
    if platform == "skypilot":
        if int(env.get("SKYPILOT_NUM_GPUS_PER_NODE") or 0) > 1:
            return None
        return (int(env["SKYPILOT_NODE_RANK"]), int(env.get("SKYPILOT_NUM_NODES", 1)),
                skypilot_head(env.get("SKYPILOT_NODE_IPS", "")), int(env.get("MASTER_PORT") or 29500))
    return None


def skypilot_head(node_ips: str) -> str:
    """SkyPilot lists its nodes' addresses one per line, the head node's first."""
    return (node_ips.split() or ["127.0.0.1"])[0]


def slurm_port(job_id: str) -> int:
    """A port every task of the job derives alike, spread so that jobs sharing a node rarely collide."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 15000 + int(digits[-4:]) % 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """`gpu[01-03,07],cpu5` -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']."""
    hosts: list[str] = []
    for prefix, ranges, _ in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?(,|$)", nodelist):
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def export_for_libraries(env: ClusterEnv) -> None:
    """Libraries that read the launcher's variables themselves (DeepSpeed asserts on LOCAL_RANK)
    get them also when the process came from srun or is a lone process."""
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_world_size))


def torchrun_arguments(environ: Mapping[str, str] | None = None) -> list[str]:
    """The torchrun options that place this node of a Kubernetes job in the job, from the platform's
    variables. torchrun reads the PET_* ones (Kubeflow's) by itself; the others are spelled out here."""
    env = os.environ if environ is None else environ
    platform = platform_of(env)
    if platform == "pytorchjob" and "PET_MASTER_ADDR" not in env and "PET_RDZV_ENDPOINT" not in env:
        return [f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
                f"--master_port={env.get('MASTER_PORT', 29500)}"]
    if platform == "indexed-job":
        return [f"--nnodes={env.get('NNODES', 1)}", f"--nproc_per_node={env.get('NPROC_PER_NODE', 'auto')}",
                f"--node_rank={env['JOB_COMPLETION_INDEX']}", f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
                f"--master_port={env.get('MASTER_PORT', 29500)}"]
    return []
