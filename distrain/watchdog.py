"""Hang watchdog: a background thread per rank that fails the run, with stack dumps and
the names of the ranks that are behind, when no training step completes in time.

The training loop only assigns two attributes per step (the step and the phase it is in:
no I/O, no collectives). The thread publishes them to the process group's key-value
store every few seconds, so when one rank hangs, the others can still tell which rank
never reached the collective they are all waiting in. The first rank whose watchdog fires
says so in the store; the others fire at their next check, and each waits (briefly) for
every rank's stack dump before exiting, so that no rank's exit ends another's run (a peer
that exits is an error to the ranks waiting for it) before its stacks are in its log.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import threading
import time

log = logging.getLogger("distrain")

PHASES = ("data", "count", "forward", "backward", "optimizer", "eval", "checkpoint", "done")  # order within a step
WATCHDOG_EXIT_CODE = 1
FIRED, DUMPED = "distrain/watchdog/fired", "distrain/watchdog/dumped"


class Watchdog:
    def __init__(self, timeout_s: int, rank: int, world_size: int, store=None, log_stream=None):
        self.timeout_s, self.rank, self.world_size = timeout_s, rank, world_size
        self.store, self.log_stream = store, log_stream
        self.step, self.phase = 0, "data"
        self.interval = max(0.2, min(2.0, timeout_s / 4))
        self._last_step, self._last_change = -1, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distrain-watchdog", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.phase in ("eval", "checkpoint", "done"):  # not training steps: not timed
                self._last_change = time.monotonic()
                continue
            self._publish()
            if self._peer_fired():
                self._fire()
            if self.step != self._last_step:
                self._last_step, self._last_change = self.step, time.monotonic()
            elif time.monotonic() - self._last_change > self.timeout_s:
                self._fire()

    def _publish(self) -> None:
        if self.store is not None:
            try:
                self.store.set(f"distrain/watchdog/{self.rank}", f"{self.step} {PHASES.index(self.phase)}")
            except Exception:  # noqa: BLE001 - a store that went away must not kill the watchdog itself
                pass

    def _peer_fired(self) -> bool:
        try:
            return self.store is not None and self.store.check([FIRED])
        except Exception:  # noqa: BLE001
            return False

    def _wait_for_dumps(self, deadline_s: float) -> None:
        """Until every rank's stacks are in its log, or deadline_s: a hung rank's watchdog thread
        still runs and dumps; a rank that is already gone never will."""
        keys = [f"{DUMPED}/{r}" for r in range(self.world_size)]
        end = time.monotonic() + deadline_s
        while time.monotonic() < end and not self._stop.is_set():
            try:
                if self.store.check(keys):
                    return
            except Exception:  # noqa: BLE001
                return
            self._stop.wait(0.05)

    def _positions(self) -> dict[int, tuple[int, int]]:
        where = {}
        for r in range(self.world_size):
            try:
                step, phase = self.store.get(f"distrain/watchdog/{r}").decode().split()
                where[r] = (int(step), int(phase))
            except Exception:  # noqa: BLE001 - a rank that never published is behind everyone
                where[r] = (-1, -1)
        return where

    def laggards(self) -> list[int]:
        if self.store is None or self.world_size == 1:
            return [self.rank]
        where = self._positions()
        lowest = min(where.values())
        behind = [r for r, pos in where.items() if pos == lowest]
        return behind if len(behind) < self.world_size else list(range(self.world_size))

    def _fire(self) -> None:
        self._publish()
        if self.log_stream is not None:
            self.log_stream.write(f"watchdog: Python stacks of rank {self.rank}, all threads:\n")
            self.log_stream.flush()
            faulthandler.dump_traceback(file=self.log_stream, all_threads=True)
        behind = self.laggards()
        names = ", ".join(map(str, behind))
        log.error("watchdog: no training step completed within %d s (log.watchdog_s) after step %d; "
                  "rank(s) %s did not reach the step (at '%s' on this rank %d); stacks are in logs/rank*.log",
                  self.timeout_s, self.step, names, self.phase, self.rank)
        for h in logging.getLogger("distrain").handlers:
            h.flush()
        if self.store is not None and self.world_size > 1:
            try:
                self.store.set(FIRED, str(self.rank))
                self.store.set(f"{DUMPED}/{self.rank}", "1")
            except Exception:  # noqa: BLE001
                pass
            self._wait_for_dumps(2 * self.interval + 1)
        os._exit(WATCHDOG_EXIT_CODE)  # the main thread is stuck: nothing else can end the process


class NoWatchdog:
    """Stands in when log.watchdog_s is 0: the loop assigns the same attributes, nothing watches."""

    step, phase = 0, "data"

    def close(self) -> None:
        pass


class Phases:
    """Where a step is (for the watchdog) and how long its own work took (for stragglers):
    `with phases("forward"): ...`, one phase at a time."""

    def __init__(self, watchdog):
        self.watchdog = watchdog
        self.seconds: dict[str, float] = {}
        self._name, self._start = "data", 0.0

    def __call__(self, name: str) -> Phases:
        self._name = name
        return self

    def __enter__(self) -> None:
        self.watchdog.phase = self._name
        self._start = time.perf_counter()

    def __exit__(self, *exc) -> bool:
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start
        return False

    def take(self, *names: str) -> float:
        """The seconds spent in these phases since the last take (and forget all)."""
        total = sum(self.seconds.get(n, 0.0) for n in names)
        self.seconds.clear()
        return total
