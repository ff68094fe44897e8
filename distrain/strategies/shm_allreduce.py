"""DDP's gradient all-reduce through shared memory, for CPU ranks that share one machine.

gloo's TCP all-reduce between processes on one host costs ~1-3 ms per bucket on a small
machine, whatever the bucket's size: more than the step of a small model. Here each rank
copies its (pre-divided) bucket into its slot of a buffer every rank has mapped, one
barrier, and each rank sums the slots in rank order. Two ranks get gloo's exact result
(a + b is commutative); more ranks get one fixed order, the same on every rank. Two
buffers alternate, so the next bucket's writes cannot overtake a slower rank's reads of
this one without the barrier in between.

Whether every rank sees the same memory is tested, not assumed from launcher variables:
rank 0 writes a random token into a fresh file and each rank must read it back.
"""
from __future__ import annotations

import logging
import os
import secrets
import tempfile

import torch
import torch.distributed as dist

log = logging.getLogger("distrain")

_ALIGN = 64
_TOKEN = 16  # bytes at the start of the file, before the slots


def shared_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def max_bucket_bytes(module: torch.nn.Module, bucket_cap_mb: float = 25.0) -> int:
    """An upper bound on DDP's bucket size: its cap, or one parameter larger than the cap."""
    sizes = [p.numel() * p.element_size() for p in module.parameters() if p.requires_grad]
    need = min(sum(sizes), max([int(bucket_cap_mb * 2**20)] + sizes))
    return -(-need // _ALIGN) * _ALIGN


class ShmAllReduce:
    """A DDP communication hook's state; `attach` registers it, or returns False when the
    ranks cannot share memory (other machines, no room), leaving DDP on its own all-reduce."""

    def __init__(self, buffer: torch.Tensor, rank: int, world_size: int):
        self.buffer, self.rank, self.world_size, self.calls = buffer, rank, world_size, 0

    @classmethod
    def create(cls, slot_bytes: int) -> ShmAllReduce | None:
        """Collective."""
        rank, world = dist.get_rank(), dist.get_world_size()
        size = _TOKEN + 2 * world * slot_bytes
        token = secrets.token_bytes(_TOKEN)
        name, path = [None], None
        if rank == 0:
            path = os.path.join(shared_dir(), f"distrain-ddp-{secrets.token_hex(8)}")
            try:
                with open(path, "wb") as f:
                    f.truncate(size)
                    os.posix_fallocate(f.fileno(), 0, size)  # tmpfs is sparse: reserve now, not SIGBUS later
                    f.write(token)
                name = [(os.path.basename(path), token)]
            except OSError as e:
                log.info("DDP all-reduce stays on gloo: no room for %d bytes in %s (%s)", size, shared_dir(), e)
                _unlink(path)
        dist.broadcast_object_list(name)
        if name[0] is None:
            return None
        filename, token = name[0]
        mine = os.path.join(shared_dir(), filename)  # this rank's own directory: on another machine it is not there
        try:
            with open(mine, "rb") as f:  # before mapping, which would create the file
                ok = f.read(_TOKEN) == token
            if ok:
                buffer = torch.from_file(mine, shared=True, size=size, dtype=torch.uint8)
        except (OSError, RuntimeError):
            ok = False
        everyone = torch.tensor([0 if ok else 1])
        dist.all_reduce(everyone)  # also: every rank has mapped it before it goes
        if rank == 0:
            _unlink(path)  # the mappings keep the memory; nothing is left behind after a kill
        if everyone.item():
            log.info("DDP all-reduce stays on gloo: the ranks do not share one machine's memory")
            return None
        slots = buffer[_TOKEN:].view(2, world, slot_bytes)
        return cls(slots, rank, world)

    def allreduce(self, bucket: torch.Tensor) -> torch.Tensor:
        nbytes = bucket.numel() * bucket.element_size()
        slots = self.buffer[self.calls % 2, :, :nbytes]
        self.calls += 1
        bucket.div_(self.world_size)  # where DDP's own path divides, so the sums match it
        slots[self.rank].view(bucket.dtype).copy_(bucket.view(-1))
        dist.barrier()
        out = bucket.view(-1)
        out.copy_(slots[0].view(bucket.dtype))
        for i in range(1, self.world_size):
            out.add_(slots[i].view(bucket.dtype))
        return bucket


def shm_allreduce_hook(state, bucket):  # unannotated: DDP rejects the string annotations of this module
    future = torch.futures.Future()
    future.set_result(state.allreduce(bucket.buffer()))
    return future


def attach(ddp_module) -> bool:
    """Collective: every rank of the DDP group calls it."""
    state = ShmAllReduce.create(max_bucket_bytes(ddp_module.module))
    if state is None:
        return False
    ddp_module.register_comm_hook(state, shm_allreduce_hook)
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
