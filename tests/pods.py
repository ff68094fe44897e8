"""A test model that stops its own pod: at a chosen training forward, a rank sends SIGTERM to its
parent process, the pod's main process (the launcher running torchrun), as Kubernetes does when it
deletes, drains or preempts a pod. A marker file per rank makes it happen once, so the relaunch
runs the very same command."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from torch import nn

from distrain.models.vision import mlp


class StopPod(nn.Module):
    def __init__(self, net: nn.Module, at: int, ranks: list, marker: str):
        super().__init__()
        self.net, self.at, self.ranks, self.marker = net, at, list(ranks), marker
        self.forwards = 0

    def forward(self, x):
        if self.training:
            if self.forwards == self.at:
                self._stop_pod()
            self.forwards += 1
        return self.net(x)

    def _stop_pod(self) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        marker = Path(f"{self.marker}.rank{rank}")
        if rank in self.ranks and self.marker and not marker.exists():
            marker.write_text(str(os.getppid()))
            os.kill(os.getppid(), signal.SIGTERM)


def stop_pod_mlp(in_shape, num_classes: int, hidden: list = (32, 32), at: int = -1, ranks: list = (0, 1),
                 marker: str = ""):
    return StopPod(mlp(in_shape, num_classes, hidden), at, ranks, marker)
