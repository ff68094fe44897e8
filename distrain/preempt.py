"""Preemption: a signal only sets a flag; the ranks agree on it at a step boundary.

How they agree is handed in (dist.Collectives.stop_agreement): every rank sees the same
answer at the same step, so all of them checkpoint together.
"""
from __future__ import annotations

import os
import signal


class Preemption:
    def __init__(self, signal_names: list[str], agreement):
        self.requested = False
        self.agreement = agreement
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
        return self.agreement.should_stop(self.requested)

    def drain(self) -> None:
        """Finish any agreement in flight so no collective is left outstanding."""
        self.agreement.drain()

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
