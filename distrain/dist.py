"""Process group set-up and the few collectives the trainer needs.

Every helper works, as a no-op, when no process group exists, so one code path
serves a single process and N processes.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .cluster import ClusterEnv


def choose_backend(requested: str, strategy: str, cuda: bool) -> str:
    if requested != "auto":
        return requested
    return "nccl" if cuda and strategy not in ("single", "dp") else "gloo"


def choose_device(env: ClusterEnv, requested: str, strategy: str) -> torch.device:
    use_cuda = torch.cuda.is_available() if requested == "auto" else requested == "cuda"
    if not use_cuda:
        return torch.device("cpu")
    if strategy == "dp":  # DataParallel scatters from the first visible GPU
        return torch.device("cuda:0")
    return torch.device("cuda", env.local_rank)


_host_group = None


def init(env: ClusterEnv, backend: str, device: torch.device, timeout_s: int, needs_group: bool = False,
         shared_memory: bool = True) -> None:
    """Join the job's process group; a lone process gets a group of one when its strategy needs one.
    CPU ranks that all share this machine also get a host group (distrain.shm), unless told not to."""
    global _host_group
    if not (env.distributed or needs_group):
        return
    if not dist.is_initialized():  # else the caller made the group: join what it has
        _init_process_group(env, backend, device, timeout_s)
    _host_group = None
    if shared_memory and dist.get_backend() == "gloo" and device.type == "cpu" and dist.get_world_size() > 1:
        from .shm import HostGroup

        _host_group = HostGroup.create(timeout_s)


def _init_process_group(env: ClusterEnv, backend: str, device: torch.device, timeout_s: int) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.kind == "torchrun":
        # each elastic restart gets its own key space in the shared store: a restarted group must not
        # read the addresses its dead predecessor published there
        store = dist.TCPStore(env.master_addr, env.master_port, env.world_size,
                              is_master=not env.agent_store and env.rank == 0, timeout=timeout)
        kwargs = {"store": dist.PrefixStore(f"distrain/attempt{env.restart_count}", store)}
    elif env.kind == "slurm":
        kwargs = {"init_method": f"tcp://{env.master_addr}:{env.master_port}"}
    else:
        kwargs = {"init_method": f"tcp://127.0.0.1:{_free_port()}"}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            device_id=device if backend == "nccl" else None, **kwargs)


def host_group():
    """The shared-memory group of this machine's ranks (all of the job's), or None."""
    return _host_group


def shutdown() -> None:
    global _host_group
    _host_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def default_store():
    """The process group's key-value store (for out-of-band status such as the watchdog's), or None."""
    if not active():
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In place. A small CPU tensor (a log line's statistics, a flag) goes through the host
    group's shared memory where there is one: microseconds instead of gloo's milliseconds,
    summed in rank order as float64 (exact for counts, gloo's bits for two ranks)."""
    if not active():
        return t
    if _host_group is not None and t.device.type == "cpu" and t.numel() <= _host_group.GATHER_MAX:
        rows = _host_group.gather(t.double().flatten().tolist())
        t.copy_(torch.tensor([sum(column) for column in zip(*rows)], dtype=torch.float64).view(t.shape))
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
