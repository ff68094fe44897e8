"""Shared memory between the CPU ranks of one machine: a flag barrier and mapped buffers.

gloo's collectives between processes on one host cost 0.2-3 ms each on a small machine,
more than the step of a small model; here a barrier costs a few microseconds. Each rank
owns one cache line of flags and is its line's only writer, so no atomics are needed;
x86's store order makes whatever a rank wrote before its arrival flag visible to a rank
that sees the flag. On other architectures (no such order without fences) nothing here
is used and gloo does the work.

Whether every rank sees the same memory is tested, not assumed from launcher variables:
rank 0 writes a random token into a fresh file and each rank must read it back. A waiting
rank spins, then yields its core, and checks that its peers' processes are alive: a dead
rank is reported at once, a stuck one after strategy.timeout_s.
"""
from __future__ import annotations

import logging
import os
import platform
import secrets
import tempfile
import time

import torch
import torch.distributed as dist

log = logging.getLogger("distrain")

ALIGN = 64
_TOKEN = 64  # bytes at the start of every file: a random token, then padding
_SPINS = 2000  # busy polls (~0.2-1 ms) before a waiting rank starts yielding its core
_ARRIVALS, _PID, _PUBLISHED = 0, 1, 2  # a rank's flag line: 8 int64s, one cache line
_PROC = os.path.exists("/proc/self/stat")
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def shared_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def map_shared(nbytes: int) -> torch.Tensor | None:
    """Collective: `nbytes` of zeroed memory every rank has mapped, or None when the ranks do
    not share one machine's memory (or there is no room)."""
    rank, size = dist.get_rank(), _TOKEN + nbytes
    token, name, path = secrets.token_bytes(_TOKEN), [None], None
    if rank == 0:
        path = os.path.join(shared_dir(), f"distrain-{secrets.token_hex(8)}")
        try:
            with open(path, "wb") as f:
                f.truncate(size)
                os.posix_fallocate(f.fileno(), 0, size)  # tmpfs is sparse: reserve now, not SIGBUS later
                f.write(token)
            name = [(os.path.basename(path), token)]
        except OSError as e:
            log.info("no shared memory between ranks: no room for %d bytes in %s (%s)", size, shared_dir(), e)
            _unlink(path)
    dist.broadcast_object_list(name)
    if name[0] is None:
        return None
    filename, token = name[0]
    mine = os.path.join(shared_dir(), filename)  # this rank's own directory: on another machine it is not there
    buffer = None
    try:
        with open(mine, "rb") as f:  # before mapping, which would create the file
            if f.read(_TOKEN) == token:
                buffer = torch.from_file(mine, shared=True, size=size, dtype=torch.uint8)
    except (OSError, RuntimeError):
        pass
    missing = torch.tensor([0 if buffer is not None else 1])
    dist.all_reduce(missing)  # also: every rank has mapped it before it goes
    if rank == 0:
        _unlink(path)  # the mappings keep the memory; nothing is left behind after a kill
    if missing.item():
        log.info("no shared memory between ranks: they do not share one machine's memory")
        return None
    return buffer[_TOKEN:]


class HostGroup:
    """The ranks of a job that all run on this machine: a barrier, one published integer per
    rank, and a gather of a few floats, through shared memory."""

    GATHER_MAX = 64  # floats per rank in one gather (512 bytes: a log line's statistics for 63 ranks)

    def __init__(self, flags, values, rank: int, world_size: int, timeout_s: float):
        self.flags, self.rank, self.world_size, self.timeout_s = flags, rank, world_size, timeout_s
        self.values = values  # [parity, rank, GATHER_MAX] float64
        self.arrivals = 0
        self.peers = [r for r in range(world_size) if r != rank]
        self.pids = {r: int(flags[r, _PID]) for r in self.peers}

    @classmethod
    def create(cls, timeout_s: float) -> HostGroup | None:
        """Collective; None where shared memory cannot stand in for gloo."""
        rank, world = dist.get_rank(), dist.get_world_size()
        if not ORDERED_STORES:
            return None
        buffer = map_shared(world * (ALIGN + 2 * 8 * cls.GATHER_MAX))  # a flag line per rank, two gather areas
        if buffer is None:
            return None
        flags = buffer[: world * ALIGN].view(torch.int64).numpy().reshape(world, ALIGN // 8)
        values = buffer[world * ALIGN :].view(torch.float64).numpy().reshape(2, world, cls.GATHER_MAX)
        flags[rank, _PID] = os.getpid()
        seen = torch.tensor([1])
        dist.all_reduce(seen)  # every pid is written before any rank reads them
        group = cls(flags, values, rank, world, timeout_s)
        # peers this process cannot see (another pid namespace) could not be told dead from alive
        visible = torch.tensor([int(all(_alive(pid) for pid in group.pids.values()))])
        dist.all_reduce(visible, op=dist.ReduceOp.MIN)
        return group if visible.item() else None

    def barrier(self) -> None:
        self.arrivals += 1
        self.flags[self.rank, _ARRIVALS] = self.arrivals
        flags, target, spins, start, patient = self.flags, self.arrivals, 0, None, False
        while any(flags[r, _ARRIVALS] < target for r in self.peers):
            spins += 1
            if spins < _SPINS:
                continue
            if spins % 64 == 0:  # now and then: the clock, dead peers, the timeout
                now = time.monotonic()
                start = start or now
                self._check_peers(target, now - start)
                patient = now - start > 0.01  # a long wait (a slow batch, a save): stop burning the core
            if patient:
                time.sleep(1e-4)
            else:
                os.sched_yield()  # a rank sharing this core (more ranks than cores) gets to run

    def _check_peers(self, target: int, waited: float) -> None:
        late = [r for r in self.peers if self.flags[r, _ARRIVALS] < target]
        # read again after the liveness check: a peer may have arrived and then exited since `late`
        # was read; a dead peer's count is final
        dead = [r for r in late if not _alive(self.pids[r]) and self.flags[r, _ARRIVALS] < target]
        if dead:
            raise RuntimeError(f"rank(s) {dead} exited while the others waited for them "
                               f"(process(es) {[self.pids[r] for r in dead]} gone)")
        if waited > self.timeout_s:
            raise RuntimeError(f"rank(s) {late} did not arrive within strategy.timeout_s={self.timeout_s:g}")

    def gather(self, values: list[float]) -> list[list[float]]:
        """Collective: every rank's values (at most GATHER_MAX floats, the same count on every rank),
        in rank order. The areas alternate by barrier number: a rank writes one again only two
        barriers later, which its peers pass only once they have read it."""
        parity, n = (self.arrivals + 1) % 2, len(values)
        self.values[parity, self.rank, :n] = values
        self.barrier()
        return self.values[parity, :, :n].tolist()

    def publish(self, value: int) -> None:
        """This rank's integer; others see it after their next barrier with this rank."""
        self.flags[self.rank, _PUBLISHED] = value

    def published(self) -> list[int]:
        return [int(v) for v in self.flags[:, _PUBLISHED]]

    def stop_agreement(self) -> StopAgreement:
        return StopAgreement(self)


class StopAgreement:
    """Agreement on a stop request at step boundaries, riding on the barriers the step already runs.

    A rank that saw the request publishes the number of the host barrier after which every rank
    can see it (its next), and all stop at the first boundary by which they have passed that
    barrier. The barrier is usually the gradient average's, inside the step; only when no barrier
    has run since the last boundary does this add its own. Every rank has passed the same barriers
    at the same boundary, and a value published later names a later barrier, so a faster rank cannot
    make two ranks disagree. (gloo's all-reduce, even overlapped, took a quarter of a small model's
    step; a second barrier per step, a tenth.)"""

    def __init__(self, group: HostGroup):
        self.group = group
        self._published, self._arrivals = False, 0  # host barriers passed by the last boundary

    def should_stop(self, requested: bool) -> bool:
        group = self.group
        if requested and not self._published:
            group.publish(group.arrivals + 1)
            self._published = True
        if group.arrivals == self._arrivals:  # nothing synchronized the ranks since the last boundary
            group.barrier()
        self._arrivals = group.arrivals
        return any(0 < barrier <= self._arrivals for barrier in group.published())

    def drain(self) -> None:
        pass


def _alive(pid: int) -> bool:
    if _PROC:
        try:
            with open(f"/proc/{pid}/stat") as f:  # a killed rank stays a zombie until its launcher reaps it
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return True


def _unlink(path: str | None) -> None:
    try:
        if path:
            os.unlink(path)
    except FileNotFoundError:
        pass
