"""Preemption: a signal only sets a flag; the ranks agree on it at a step boundary.

The agreement is a one-element all-reduce started asynchronously after each step and
read one step later, so it overlaps compute instead of adding a round trip per step.
Every rank sees the same answer at the same step, so all of them checkpoint together.
CPU ranks on one machine agree through shared memory instead (distrain.shm): a rank that
saw a signal publishes the number of the host barrier after which every rank can see it
(its next), and all stop at the first boundary by which they have passed that barrier.
The barrier is usually the gradient average's, inside the step; only when no barrier has
run since the last boundary does this one add its own. Every rank has passed the same
barriers at the same boundary, and a value published later names a later barrier, so a
faster rank cannot make two ranks disagree. (gloo's all-reduce, even overlapped, took a
quarter of a small model's step there; a second barrier per step, a tenth.)
"""
from __future__ import annotations

import os
import signal

import torch

from . import dist


class Preemption:
    def __init__(self, signal_names: list[str], comm_device: torch.device):
        self.requested = False
        self.comm_device = comm_device
        self._pending = None
        self._published, self._arrivals = False, 0  # host barriers passed by the last boundary
        self._previous = {}
        for name in signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: whoever sends it means "now" (e.g. torchrun tearing down)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = True  # nothing else here: no I/O, no collectives, no locks

    def should_stop(self) -> bool:
        """Collective: True on every rank once any rank has received a signal."""
        if not dist.active() or dist.world_size() == 1:
            return self.requested
        group = dist.host_group()
        if group is not None:
            if self.requested and not self._published:
                group.publish(group.arrivals + 1)
                self._published = True
            if group.arrivals == self._arrivals:  # nothing synchronized the ranks since the last boundary
                group.barrier()
            self._arrivals = group.arrivals
            return any(0 < barrier <= self._arrivals for barrier in group.published())
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = flag.item() > 0
        flag = torch.tensor([1.0 if self.requested else 0.0], device=self.comm_device)
        self._pending = (torch.distributed.all_reduce(flag, async_op=True), flag)
        return stop

    def drain(self) -> None:
        """Finish the outstanding agreement so no collective is left in flight."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
