"""Strategies behind one small protocol. Each is built from a StrategyContext; the trainer
only ever calls the methods below, whatever the strategy."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import torch
from torch import nn

from ..cluster import ClusterEnv
from ..config import Config


@dataclass
class StrategyContext:
    cfg: Config
    env: ClusterEnv
    device: torch.device
    backend: str
    micro_batch: int
    accumulation: int

    @property
    def precision(self) -> str:
        return self.cfg.train.precision

    @property
    def compile(self) -> bool:
        return self.cfg.train.compile


class Strategy(Protocol):
    model: nn.Module  # what the trainer calls for a forward pass
    module: nn.Module  # the bare user model
    optimizer: torch.optim.Optimizer

    def setup(self, module: nn.Module, make_optimizer: Callable) -> None: ...
    def sync(self, enabled: bool) -> ContextManager: ...  # gradient sync on/off for this micro-step
    def autocast(self) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    # the pre-clip gradient norm (None if not computed: want_norm off); non-finite: no update was made
    def step(self, grad_clip: float | None, want_norm: bool = True) -> float | None: ...
    def full_model_state(self) -> dict: ...  # consolidated on rank 0; collective
    def save(self, path: Path) -> None: ...  # collective
    def load(self, path: Path) -> None: ...  # collective


def build_strategy(ctx: StrategyContext) -> Strategy:
    name = ctx.cfg.strategy.name
    if name in ("single", "dp", "ddp"):
        from . import replicated

        wrap = {"single": replicated.no_wrap, "dp": replicated.data_parallel, "ddp": replicated.ddp}[name]
        return replicated.Replicated(ctx, wrap)
    if name == "fsdp":
        from .fsdp import Fsdp

        return Fsdp(ctx)
    from .deepspeed import DeepSpeed

    return DeepSpeed(ctx)
