"""Process group set-up and the few collectives the trainer needs.

Every helper works, as a no-op, when no process group exists, so one code path
serves a single process and N processes.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from .cluster import ClusterEnv


def choose_backend(requested: str, cuda: bool, collective: bool) -> str:
    """nccl for strategies that communicate between GPU processes, gloo for everything else."""
    if requested != "auto":
        return requested
    return "nccl" if cuda and collective else "gloo"


def choose_device(env: ClusterEnv, requested: str, first_gpu: bool = False) -> torch.device:
    use_cuda = torch.cuda.is_available() if requested == "auto" else requested == "cuda"
    if not use_cuda:
        return torch.device("cpu")
    if first_gpu:  # one process driving every visible GPU from the first (DataParallel scatters from it)
        return torch.device("cuda:0")
    return torch.device("cuda", env.local_rank)


def init(env: ClusterEnv, backend: str, device: torch.device, timeout_s: int, needs_group: bool = False) -> None:
    """Join the job's process group; a lone process gets a group of one when its strategy needs one.
    A group the caller already made (an embedding program, Ray) is joined as it is."""
    if (env.distributed or needs_group) and not dist.is_initialized():
        _init_process_group(env, backend, device, timeout_s)


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


def shutdown() -> None:
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


class Collectives:
    """The run's reductions, on `device` (the communication device: CPU for gloo). `host` is an
    optional faster path for small CPU reductions and per-step agreement: the shared-memory group
    of CPU ranks that all share one machine (distrain.shm), attached by the caller."""

    def __init__(self, device: torch.device, host=None):
        self.device, self.host = device, host

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """In place. A small CPU tensor (a log line's statistics, a flag) goes through the host
        group where there is one: microseconds instead of gloo's milliseconds, summed in rank
        order as float64 (exact for counts, gloo's bits for two ranks)."""
        if not active():
            return t
        if self.host is not None and t.device.type == "cpu" and t.numel() <= self.host.GATHER_MAX:
            rows = self.host.gather(t.double().flatten().tolist())
            t.copy_(torch.tensor([sum(column) for column in zip(*rows)], dtype=torch.float64).view(t.shape))
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def agree(self, ok: bool) -> bool:
        """Collective: True on every rank iff it is True on every rank."""
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        return self.all_reduce_sum(flag).item() == 0

    def stop_agreement(self):
        """How the ranks agree, at step boundaries, that one of them was asked to stop."""
        if not active() or world_size() == 1:
            return LocalAgreement()
        return self.host.stop_agreement() if self.host is not None else OverlappedAgreement(self.device)


class LocalAgreement:
    def should_stop(self, requested: bool) -> bool:
        return requested

    def drain(self) -> None:
        pass


class OverlappedAgreement:
    """A one-element all-reduce started after each step and read one step later, so it overlaps
    compute instead of adding a round trip per step; every rank sees the same answer at the same step."""

    def __init__(self, device: torch.device):
        self.device, self._pending = device, None

    def should_stop(self, requested: bool) -> bool:
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = flag.item() > 0
        flag = torch.tensor([1.0 if requested else 0.0], device=self.device)
        self._pending = (dist.all_reduce(flag, async_op=True), flag)
        return stop

    def drain(self) -> None:
        """Finish the outstanding agreement so no collective is left in flight."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
