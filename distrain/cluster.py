"""Where this process sits in the job: the only module that reads os.environ.

Detection order: torchrun/torchelastic (it can run inside SLURM, so it wins), then a
task started directly by `srun`, then a single local process.
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
    kind: str = "single"  # single | torchrun | slurm
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
    common = dict(interactive=os.isatty(1) if environ is None else False)
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
    return ClusterEnv(job_id=env.get("SLURM_JOB_ID"), **common)


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
