"""DDP's gradient all-reduce through shared memory, for CPU ranks that share one machine.

gloo's TCP all-reduce between processes on one host costs ~1-3 ms per bucket on a small
machine, whatever the bucket's size: more than the step of a small model. Here each rank
copies its (pre-divided) bucket into its slot of a buffer every rank has mapped, one
barrier of the host group (distrain.shm), and each rank sums the slots in rank order. Two
ranks get gloo's exact result (a + b is commutative); more ranks get one fixed order, the
same on every rank. Two buffers alternate, so the next bucket's writes cannot overtake a
slower rank's reads of this one without a barrier in between.
"""
from __future__ import annotations

import torch

from .. import shm


def max_bucket_bytes(module: torch.nn.Module, bucket_cap_mb: float = 25.0) -> int:
    """An upper bound on DDP's bucket size: its cap, or one parameter larger than the cap."""
    sizes = [p.numel() * p.element_size() for p in module.parameters() if p.requires_grad]
    need = min(sum(sizes), max([int(bucket_cap_mb * 2**20)] + sizes))
    return -(-need // shm.ALIGN) * shm.ALIGN


class ShmAllReduce:
    """A DDP communication hook's state; `attach` registers it."""

    def __init__(self, slots: torch.Tensor, group: shm.HostGroup):
        self.slots, self.group, self.calls = slots, group, 0

    @classmethod
    def create(cls, group: shm.HostGroup, slot_bytes: int) -> ShmAllReduce | None:
        """Collective."""
        buffer = shm.map_shared(2 * group.world_size * slot_bytes)
        return None if buffer is None else cls(buffer.view(2, group.world_size, slot_bytes), group)

    def allreduce(self, bucket: torch.Tensor) -> torch.Tensor:
        nbytes = bucket.numel() * bucket.element_size()
        slots = self.slots[self.calls % 2, :, :nbytes]
        self.calls += 1
        bucket.div_(self.group.world_size)  # where DDP's own path divides, so the sums match it
        slots[self.group.rank].view(bucket.dtype).copy_(bucket.view(-1))
        self.group.barrier()
        out, world = bucket.view(-1), self.group.world_size
        torch.add(slots[0].view(bucket.dtype), slots[1].view(bucket.dtype), out=out)
        for i in range(2, world):
            out.add_(slots[i].view(bucket.dtype))
        return bucket


def shm_allreduce_hook(state, bucket):  # unannotated: DDP rejects the string annotations of this module
    future = torch.futures.Future()
    future.set_result(state.allreduce(bucket.buffer()))
    return future


def attach(ddp_module, group: shm.HostGroup) -> bool:
    """Collective: every rank of the DDP group calls it."""
    state = ShmAllReduce.create(group, max_bucket_bytes(ddp_module.module))
    if state is None:
        return False
    ddp_module.register_comm_hook(state, shm_allreduce_hook)
    return True
