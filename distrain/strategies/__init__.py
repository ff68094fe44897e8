"""Strategies behind one small protocol, and the one registry that knows them.

Each strategy declares what the rest of distrain needs to know about it (its checkpoint
format, whether it needs a process group, whether it can save in the background, what it
refuses) in its `Spec`; nothing outside this package compares strategy names.
"""
from __future__ import annotations

import importlib
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Protocol

import torch
from torch import nn

from ..cluster import ClusterEnv
from ..config import Config, ConfigError


@dataclass
class StrategyContext:
    """What a strategy is built from: its own config section and the few run facts it needs."""
    section: object  # StrategyConfig
    env: ClusterEnv
    device: torch.device
    backend: str
    comm: object  # dist.Collectives: its `host` is the shared-memory group of CPU ranks on one machine, or None
    micro_batch: int
    accumulation: int
    global_batch: int
    precision: str = "fp32"
    compile: bool = False
    grad_clip: float | None = None
    async_save: bool = False


class Strategy(Protocol):
    model: nn.Module  # what the trainer calls for a forward pass
    module: nn.Module  # the bare user model
    optimizer: torch.optim.Optimizer

    # init: the planned weights of a model built on the meta device (Spec.builds_empty), read by each rank
    def setup(self, module: nn.Module, make_optimizer: Callable, init=None) -> None: ...
    # one micro-batch's forward and backward: gradient sync on the step's last one only, autocast
    def micro_step(self, sync: bool) -> ContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    # multiply the gradients by grad_scale (when given), clip, update unless non-finite, clear grads; the
    # pre-clip global norm as a 0-dim tensor, read by the caller when it likes (non-finite: not applied)
    def step(self, grad_clip: float | None, grad_scale: float | None = None) -> torch.Tensor: ...
    # collective; blocking=False may return a Future that completes when the files are written
    def save(self, path: Path, blocking: bool = True) -> Future | None: ...
    def load(self, path: Path) -> None: ...  # collective
    def full_state(self) -> dict: ...  # the plain model state_dict, consolidated on rank 0; collective


@dataclass(frozen=True)
class Spec:
    name: str
    factory: str  # "module:callable" under this package, imported only when the strategy is used
    checkpoint_format: str  # full | dcp | deepspeed
    needs_group: bool  # a process group even for one process
    one_process: bool = False
    async_save: bool = False
    first_gpu: bool = False  # the process drives every visible GPU from the first one
    fp16: bool = True
    offload: bool = False
    shards_blocks: bool = False  # shards strategy.fsdp_blocks one by one
    # a model that model.init_from fills is built on the meta device and setup reads what each rank
    # holds: FSDP2 its slices, ZeRO-3 (init_partitioned) each parameter whole as it partitions it
    init_sharded: bool = False
    init_partitioned: bool = False

    def build(self, ctx: StrategyContext) -> Strategy:
        module, _, name = self.factory.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)(ctx)

    def builds_empty(self, section) -> bool:
        """Whether a model the init files fill is built without its parameters' memory."""
        return self.init_sharded or (self.init_partitioned and section.zero_stage == 3)

    def check(self, cfg: Config, world_size: int | None = None) -> None:
        """The strategy's own refusals, as config errors (world_size None: before launch facts are known)."""
        s = cfg.strategy
        if self.one_process and world_size is not None and world_size > 1:
            raise ConfigError("strategy.name", f"{self.name} runs one process but {world_size} were launched; "
                                               "use ddp, fsdp or deepspeed")
        if not self.fp16 and cfg.train.precision == "fp16":
            raise ConfigError("train.precision", f"fp16 is not supported with {self.name}; use bf16")
        if cfg.checkpoint.async_save and not self.async_save:
            raise ConfigError("checkpoint.async_save", "needs a strategy with sharded DCP checkpoints "
                                                       f"({', '.join(n for n, other in STRATEGIES.items() if other.async_save)})")
        if s.offload != "none" and not self.offload:
            raise ConfigError("strategy.offload", "CPU offload needs strategy.name=deepspeed")
        if self.offload and s.offload == "optimizer+params" and s.zero_stage != 3:
            raise ConfigError("strategy.offload", "offloading params needs strategy.zero_stage=3")
        if s.fsdp_blocks and not self.shards_blocks:
            raise ConfigError("strategy.fsdp_blocks", "names the blocks FSDP2 shards one by one: it needs "
                                                      f"strategy.name=fsdp ({self.name} would ignore it)")


STRATEGIES = {
    "single": Spec("single", "replicated:single", "full", needs_group=False, one_process=True),
    "dp": Spec("dp", "replicated:data_parallel", "full", needs_group=False, one_process=True, first_gpu=True),
    "ddp": Spec("ddp", "replicated:ddp", "full", needs_group=True),
    "fsdp": Spec("fsdp", "fsdp:Fsdp", "dcp", needs_group=True, async_save=True, fp16=False,
                 shards_blocks=True, init_sharded=True),
    "deepspeed": Spec("deepspeed", "deepspeed:DeepSpeed", "deepspeed", needs_group=True, offload=True,
                      init_partitioned=True),
}


def spec(name: str) -> Spec:
    return STRATEGIES[name]  # the config's Literal type has already refused unknown names
