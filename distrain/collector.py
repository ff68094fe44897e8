"""Python's garbage collector in step with the ranks.

The automatic collector runs whenever enough container objects have been allocated: at a
different step on each rank, and now and then a full pass over everything torch imported
(~0.1 s). Every other rank then waits for the collecting one at the next gradient exchange.
During training the automatic collector is off and a young-generation collection runs every
`train.gc_every` steps, on every rank at the same step (torchtitan does the same); the
collector is switched back on when the loop ends. Cyclic garbage that outlives a young
collection waits for the end of training (or the next full collection the user runs).
"""
from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def lockstep(every: int):
    """Yields collect(step), to call after each step; every <= 0 leaves the automatic collector on."""
    if every <= 0 or not gc.isenabled():  # off already: the caller manages it
        yield lambda step: None
        return
    gc.collect()  # what set-up left behind, once, before the ranks start waiting on each other
    gc.disable()

    def collect(step: int) -> None:
        if step % every == 0:
            gc.collect(1)

    try:
        yield collect
    finally:
        gc.enable()
