"""A test-only model that stops at a chosen point until the test lets it go, loaded by import path
(`model.name=tests.gates:gated_mlp`). Rank 0 prints `gate reached` and blocks reading a FIFO the test
made; the test does what it needs (fills a disk, starts a second launch, kills the process) and
opens the gate by writing to the FIFO. Passing the gate removes the FIFO, so a relaunch runs
straight through."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from distrain.models.vision import mlp

GATE_REACHED = "gate reached"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class Gate(nn.Module):
    def __init__(self, net: nn.Module, fifo: str, at_forward: int, on_save_after: int):
        super().__init__()
        self.net, self.fifo, self.at_forward, self.on_save_after = net, fifo, at_forward, on_save_after
        self.train_forwards = 0

    def _wait(self) -> None:
        if _rank() != 0 or not self.fifo or not Path(self.fifo).exists():
            return
        print(GATE_REACHED, flush=True)
        with open(self.fifo) as f:  # blocks until the test opens the FIFO for writing, returns once it closes it
            f.read()
        os.unlink(self.fifo)

    def forward(self, x):
        if self.training:
            if self.train_forwards == self.at_forward:
                self._wait()
            self.train_forwards += 1
        return self.net(x)

    def state_dict(self, *args, **kwargs):
        if 0 <= self.on_save_after <= self.train_forwards:
            self._wait()
        return super().state_dict(*args, **kwargs)


def gated_mlp(in_shape, num_classes: int, hidden: list = (32, 32), fifo: str = "", at_forward: int = -1,
              on_save_after: int = -1):
    """at_forward: the training forward (counted from this process's start) that waits at the gate;
    on_save_after: the first checkpoint after that many training forwards waits as it starts writing
    the model's own files."""
    return Gate(mlp(in_shape, num_classes, hidden), fifo, at_forward, on_save_after)


def open_gate(fifo: Path) -> None:
    with open(fifo, "w") as f:
        f.write("go")


def wait_for_gate(proc) -> list[str]:
    """Read the process's stdout until rank 0 reports the gate; the lines read so far."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip().endswith(GATE_REACHED):
            return lines
    raise AssertionError("the process ended before reaching the gate:\n" + "".join(lines[-40:]))
