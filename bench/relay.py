"""Fine-grained interleaving of loops that each run in their own process.

Machine drift on a shared VM moves a whole process's step time by 10-30% within seconds,
so loops run one after the other (each for a second or so) compare different machines.
Here every loop runs in its own process and they take turns by window of WINDOW steps:
a coordinator hands a token to one process at a time (A B C D, then B C D A, ...) and only
the holder runs, so loops in the same cycle are compared over the same ~100 ms. A window's
time runs from the token's arrival to the top of the iteration after its last step, so
everything a loop does between steps is inside it; the hand-over itself is not.

Every process is pinned to the same core: on a VM the cores differ in speed from moment to
moment (other tenants), and a process that settled on the slower one carried that into its
whole round (two copies of the same loop differed by 5-15% per round unpinned, 1-3% pinned).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

WINDOW = 25


class Baton:
    """The worker's side: `tick()` at the top of every iteration, `finish()` after the loop."""

    def __init__(self, go_fd: int, done_fd: int, cpu: int):
        self.go, self.done = go_fd, done_fd
        os.sched_setaffinity(0, {cpu})
        self.count, self.started, self.windows = 0, 0.0, []

    @classmethod
    def from_env(cls) -> Baton | None:
        fds = os.environ.get("BENCH_BATON")
        return cls(*map(int, fds.split(","))) if fds else None  # go, done, cpu

    def tick(self) -> None:
        if self.count % WINDOW == 0:
            now = time.perf_counter()
            if self.count:
                self.windows.append((now - self.started) / WINDOW)
            os.write(self.done, b".")  # the first one says "set up and ready"
            os.read(self.go, 1)
            self.started = time.perf_counter()
        self.count += 1

    def finish(self) -> None:
        os.write(self.done, b".")


def run_relay(commands: dict[str, list[str]], cycles: int, env: dict) -> dict[str, list[float]]:
    """Starts one process per loop, waits until each is ready, then runs `cycles` cycles of one
    window each, rotating the order per cycle. Returns each loop's window means, by cycle;
    each process's stdout must end with a line `RESULT <json>`, which is returned too."""
    procs, pipes = {}, {}
    cpu = max(os.sched_getaffinity(0))
    for name, cmd in commands.items():
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        procs[name] = subprocess.Popen(cmd, env={**env, "BENCH_BATON": f"{go_r},{done_w},{cpu}"},
                                       pass_fds=(go_r, done_w), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
        os.close(go_r), os.close(done_w)
        pipes[name] = (go_w, done_r)
    try:
        for name in commands:  # everyone has imported and built its model
            _expect(os.read(pipes[name][1], 1), name, procs)
        names = list(commands)
        for c in range(cycles):
            for name in names[c % len(names):] + names[:c % len(names)]:
                os.write(pipes[name][0], b".")
                _expect(os.read(pipes[name][1], 1), name, procs)
        results = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                raise RuntimeError(f"{name} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
            results[name] = json.loads(line[7:])
        return results
    finally:
        for proc in procs.values():
            proc.kill()
        for fds in pipes.values():
            for fd in fds:
                os.close(fd)


def _expect(byte: bytes, name: str, procs: dict) -> None:
    if byte != b".":  # end of file: the worker died before its turn was over
        _, err = procs[name].communicate(timeout=60)
        raise RuntimeError(f"{name} exited early:\n{err[-3000:]}")


def paired_ratios(windows: dict[str, list[float]], base: str, skip: int) -> dict[str, list[float]]:
    """Per cycle after `skip` warm-up cycles: each loop's window mean / the base loop's, same cycle."""
    n = min(len(w) for w in windows.values())
    return {name: [w[c] / windows[base][c] for c in range(skip, n)] for name, w in windows.items()}
