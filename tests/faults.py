"""Test-only models and data that die or record at a chosen point, loaded by import path
(`model.name=tests.faults:killable_mlp`). A marker file per rank makes a kill happen once,
so the relaunch runs the very same command to the end."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrain.models.vision import mlp


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class KillSwitch(nn.Module):
    def __init__(self, net, kill_at, kill_eval_at, kill_on_save_after, marker, record, hang_at=-1, hang_rank=0,
                 kill_rank=-1, kill_signal="SIGKILL"):
        super().__init__()
        self.hang_at, self.hang_rank, self.kill_rank = hang_at, hang_rank, kill_rank
        self.kill_signal = getattr(signal, kill_signal)
        self.net = net
        self.kill_at, self.kill_eval_at, self.kill_on_save_after = kill_at, kill_eval_at, kill_on_save_after
        self.marker, self.record = marker, record
        self.train_forwards = self.eval_forwards = 0

    def _die(self) -> None:
        # once per run: a rank that the launcher took down before it got here must not die on the relaunch
        marker = Path(f"{self.marker}.rank{_rank()}")
        if self.kill_rank >= 0 and _rank() != self.kill_rank:
            return
        if not self.marker or list(marker.parent.glob(f"{marker.name.rsplit('.', 1)[0]}.rank*")):
            return
        marker.write_text("killed")
        os.kill(os.getpid(), self.kill_signal)

    def forward(self, x):
        if self.training:
            if self.train_forwards == self.hang_at and _rank() == self.hang_rank:
                threading.Event().wait()  # a hang: this rank never returns
            if self.train_forwards == self.kill_at:
                self._die()
            self.train_forwards += 1
            if self.record:
                with open(f"{self.record}.rank{_rank()}", "a") as f:
                    f.write(" ".join(str(int(i)) for i in x[:, 0, 0, 0].tolist()) + "\n")
        else:
            if self.eval_forwards == self.kill_eval_at:
                self._die()
            self.eval_forwards += 1
        return self.net(x)

    def state_dict(self, *args, **kwargs):
        if 0 <= self.kill_on_save_after <= self.train_forwards:
            self._die()
        return super().state_dict(*args, **kwargs)


def killable_mlp(in_shape, num_classes: int, hidden: list = (32, 32), kill_at: int = -1, kill_eval_at: int = -1,
                 kill_on_save_after: int = -1, marker: str = "", record: str = "", hang_at: int = -1, hang_rank: int = 0,
                 kill_rank: int = -1, kill_signal: str = "SIGKILL"):
    """kill_signal: SIGKILL dies; a preemption signal (SIGTERM, SIGUSR1) asks for a checkpoint and an exit."""
    return KillSwitch(mlp(in_shape, num_classes, hidden), kill_at, kill_eval_at, kill_on_save_after, marker, record,
                      hang_at, hang_rank, kill_rank, kill_signal)


def indexed_digits(n_train: int = 384):
    """The digits set with each image's first pixel replaced by its index, so a model can record ids."""
    from distrain.data.datasets import digits

    train, evaluation, meta = digits()
    x, y = train.tensors
    x, y = x[:n_train].clone(), y[:n_train]
    x[:, 0, 0, 0] = torch.arange(n_train, dtype=x.dtype)
    return TensorDataset(x, y), evaluation, meta


class _BeforeForward(nn.Module):
    """Runs `action(forward_index)` before each forward of the wrapped model."""

    def __init__(self, inner: nn.Module, action):
        super().__init__()
        self.inner, self.action, self.forwards = inner, action, 0

    def forward(self, x):
        self.action(self.forwards)
        self.forwards += 1
        return self.inner(x)


def _on_rank1(model: nn.Module, action) -> nn.Module:
    # the launcher's RANK: models are built before the process group exists
    return _BeforeForward(model, action) if os.environ.get("RANK") == "1" else model


def _warn_once(index: int) -> None:
    if index == 0:
        import logging

        logging.getLogger("distrain").warning("a warning of rank 1's own")


def warning_mlp(in_shape, num_classes: int, hidden: list = (32, 32)):
    """Warns like a library would, on every rank; rank 1 also logs a warning of its own at its
    first forward."""
    import warnings

    warnings.warn("a library warning", UserWarning)
    return _on_rank1(mlp(in_shape, num_classes, hidden), _warn_once)


def slow_rank1_mlp(in_shape, num_classes: int, hidden: list = (32, 32)):
    """Rank 1's forward takes 30 ms longer than rank 0's."""
    # the sleep stands in for a slower rank's work, not for synchronisation
    return _on_rank1(mlp(in_shape, num_classes, hidden), lambda index: time.sleep(0.03))
