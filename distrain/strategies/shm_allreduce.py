"""Gradient averaging through shared memory, for CPU ranks that share one machine.

gloo's TCP all-reduce between processes on one host costs ~1-3 ms per bucket on a small
machine, whatever the bucket's size: more than the step of a small model. Here each rank
divides its gradients by the world size and copies them into its slot of a buffer every
rank has mapped, one barrier of the host group (distrain.shm), and each rank sums the slots
in rank order. Two ranks get gloo's exact result (a + b is commutative: each adds the
other's share to its own); more ranks get one fixed order, the same on every rank. Two
buffers alternate, so the next chunk's writes cannot overtake a slower rank's reads of
this one without a barrier in between.

Two ways in. `GradientAverager` averages the bare module's gradients after backward: the
model runs unwrapped, with none of DDP's per-forward checks or per-gradient reducer hooks,
which cost a small model more than the averaging itself (there is no communication to
overlap with backward: the copies run on the rank's own core either way). Modules with
buffers keep DDP, which broadcasts them every forward, with its all-reduce replaced by the
same slots (`attach`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import shm

SLOT_CAP_BYTES = 25 * 2**20  # DDP's default bucket cap: what one rank's slot holds at most


def _aligned(nbytes: int) -> int:
    return -(-nbytes // shm.ALIGN) * shm.ALIGN


class Slots:
    """Two alternating sets of per-rank slots and the barrier between writing and reading them."""

    def __init__(self, buffer: torch.Tensor, group: shm.HostGroup, slot_bytes: int):
        self.buffer, self.group, self.calls = buffer.view(2, group.world_size, slot_bytes), group, 0
        world = group.world_size
        # x * 2**-k is x / 2**k, bit for bit, and a cheaper pass
        self.scale = (torch._foreach_mul_, 1.0 / world) if world & (world - 1) == 0 else (torch._foreach_div_, world)

    @classmethod
    def create(cls, group: shm.HostGroup, slot_bytes: int) -> Slots | None:
        """Collective."""
        slot_bytes = _aligned(slot_bytes)
        buffer = shm.map_shared(2 * group.world_size * slot_bytes)
        return None if buffer is None else cls(buffer, group, slot_bytes)

    def average(self, pieces: list, views: list) -> None:
        """Collective: replace each piece by its mean over the ranks, the way DDP computes it:
        each rank's share divided by the world size, then summed in rank order.

        views[parity][rank]: tensors over that slot, one per piece and shaped like it."""
        self.calls += 1
        parity, rank, world = self.calls % 2, self.group.rank, self.group.world_size
        slots = views[parity]
        scale, by = self.scale
        scale(pieces, by)
        torch._foreach_copy_(slots[rank], pieces)
        self.group.barrier()
        if world == 2:  # a + b == b + a: each rank adds the other's share to its own
            torch._foreach_add_(pieces, slots[1 - rank])
            return
        if rank != 0:  # summed in rank order: the same bits on every rank (rank 0's pieces are slot 0)
            torch._foreach_copy_(pieces, slots[0])
        for r in range(1, world):
            torch._foreach_add_(pieces, slots[r])


class GradientAverager:
    """DDP's contract for ranks on one machine: after the last backward of a step, every rank
    holds the mean of all ranks' gradients, computed the way DDP computes it."""

    def __init__(self, slots: Slots, params: list):
        self.slots, self.params = slots, params
        self.world = slots.group.world_size
        # a gradient always has its parameter's shape and dtype (torch enforces it): one plan
        self.plan = self._plan(params)

    @classmethod
    def create(cls, group: shm.HostGroup, module: torch.nn.Module) -> GradientAverager | None:
        """Collective: every rank calls it with the same model."""
        params = [p for p in module.parameters() if p.requires_grad]
        total = sum(_aligned(p.numel() * p.element_size()) for p in params)
        slots = Slots.create(group, min(total, SLOT_CAP_BYTES))
        return None if slots is None else cls(slots, params)

    def average(self) -> None:
        grads = []
        for i, p in enumerate(self.params):
            if p.grad is None:  # DDP refuses this too: the ranks would disagree on what to sum
                raise RuntimeError(f"ddp: parameter {i} of the model received no gradient in this step; every "
                                   "parameter that requires a gradient must take part in every step's loss")
            if not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            grads.append(p.grad)
        for spans, views in self.plan:
            self.slots.average([_piece(grads[i], a, b) for i, a, b in spans], views)

    def _plan(self, params: list) -> list:
        """(spans, views) per chunk: spans are (parameter index, first element, end element)
        that fit one slot together (a gradient larger than a slot spans several chunks);
        views[parity][rank] are tensors over that slot, one per span, shaped like its piece of the
        gradient."""
        cap, chunks, spans, offsets, used = self.slots.buffer.shape[-1], [], [], [], 0
        for i, p in enumerate(params):
            start, size = 0, p.element_size()
            while start < p.numel():
                room = (cap - used) // size
                if room == 0:
                    chunks.append((spans, offsets))
                    spans, offsets, used = [], [], 0
                    continue
                end = min(p.numel(), start + room)
                spans.append((i, start, end))
                offsets.append(used)
                used = _aligned(used + (end - start) * size)
                start = end
        if spans:
            chunks.append((spans, offsets))
        return [(spans, self._views(params, spans, offsets)) for spans, offsets in chunks]

    def _views(self, params: list, spans: list, offsets: list) -> list:
        views = []
        for parity in range(2):
            per_rank = []
            for r in range(self.world):
                slot = self.slots.buffer[parity, r]
                per_rank.append([slot[at : at + (b - a) * params[i].element_size()].view(params[i].dtype)
                                 .view(_piece(params[i], a, b).shape) for (i, a, b), at in zip(spans, offsets)])
            views.append(per_rank)
        return views


def _piece(g: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return g if start == 0 and end == g.numel() else g.view(-1)[start:end]


def broadcast_module(module: torch.nn.Module) -> None:
    """Collective: rank 0's parameters and buffers everywhere, as DDP does when it wraps a model."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, 0)


class BucketAllReduce:
    """A DDP communication hook's state, for modules that stay under DDP; `attach` registers it."""

    def __init__(self, slots: Slots):
        self.slots = slots

    def allreduce(self, bucket: torch.Tensor) -> torch.Tensor:
        # slot-sized pieces: DDP's buckets may outgrow its cap (a whole 11M-parameter ResNet came as one)
        flat, per_slot = bucket.view(-1), self.slots.buffer.shape[-1] // bucket.element_size()
        for start in range(0, flat.numel(), per_slot):
            piece = flat[start : start + per_slot]
            nbytes = piece.numel() * piece.element_size()
            views = [[[slot[:nbytes].view(bucket.dtype)] for slot in by_rank] for by_rank in self.slots.buffer]
            self.slots.average([piece], views)
        return bucket


def max_bucket_bytes(module: torch.nn.Module) -> int:
    """An upper bound on DDP's bucket size: its cap, or one parameter larger than the cap."""
    sizes = [p.numel() * p.element_size() for p in module.parameters() if p.requires_grad]
    return min(sum(sizes), max([SLOT_CAP_BYTES] + sizes))


def shm_allreduce_hook(state, bucket):  # unannotated: DDP rejects the string annotations of this module
    future = torch.futures.Future()
    future.set_result(state.allreduce(bucket.buffer()))
    return future


def attach(ddp_module, group: shm.HostGroup) -> bool:
    """Collective: every rank of the DDP group calls it."""
    slots = Slots.create(group, max_bucket_bytes(ddp_module.module))
    if slots is None:
        return False
    ddp_module.register_comm_hook(BucketAllReduce(slots), shm_allreduce_hook)
    return True


def wrap(module: torch.nn.Module, group: shm.HostGroup):
    """Collective. The one way in for `ddp` on CPU ranks sharing a machine: (model to run, function
    that averages the gradients before the optimizer step, or None when the model's DDP wrapper
    does it during backward), or None where shared memory cannot be had (plain DDP then)."""
    import logging

    from torch.nn.parallel import DistributedDataParallel

    log = logging.getLogger("distrain")
    if next(module.buffers(), None) is None:  # DDP would broadcast buffers every forward: not needed
        averager = GradientAverager.create(group, module)
        if averager is not None:
            broadcast_module(module)
            log.info("ddp: gradients averaged through shared memory (all %d ranks on this machine)", group.world_size)
            return module, averager.average
    wrapped = DistributedDataParallel(module)
    if not attach(wrapped, group):
        return wrapped, None
    log.info("ddp: gradients all-reduced through shared memory (all %d ranks on this machine)", group.world_size)
    return wrapped, None
