"""Strategies that keep a full model replica per process: `single`, `dp`
(nn.DataParallel) and `ddp`. They differ only in how the module is wrapped, so one
class takes the wrapping as a function instead of three classes copying each other."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import dist
from . import common

log = logging.getLogger("distrain")


def no_wrap(module, ctx):
    return module, None


def data_parallel(module, ctx):
    if ctx.device.type == "cuda" and torch.cuda.device_count() > 1:
        return nn.DataParallel(module), None
    log.warning("strategy dp: fewer than 2 GPUs visible, running as a single process on %s", ctx.device)
    return module, None


def ddp(module, ctx):
    """The model to run and, where no DDP wrapper averages the gradients during backward, the
    function that averages them before the optimizer step."""
    if ctx.env.world_size == 1:  # nothing to all-reduce; DDP would still pay a collective per step
        return module, None
    group = dist.host_group()
    if group is not None and next(module.buffers(), None) is None:  # DDP broadcasts buffers every forward
        from . import shm_allreduce

        averager = shm_allreduce.GradientAverager.create(group, module)
        if averager is not None:
            shm_allreduce.broadcast_module(module)
            log.info("ddp: gradients averaged through shared memory (all %d ranks on this machine)",
                     ctx.env.world_size)
            return module, averager.average
    wrapped = DistributedDataParallel(module, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    if group is not None:
        from . import shm_allreduce

        if shm_allreduce.attach(wrapped, group):
            log.info("ddp: gradients all-reduced through shared memory (all %d ranks on this machine)",
                     ctx.env.world_size)
    return wrapped, None


class Replicated:
    def __init__(self, ctx, wrap):
        self.ctx, self.wrap = ctx, wrap
        self.scaler = common.grad_scaler(ctx.device, ctx.precision)

    def setup(self, module, make_optimizer) -> None:
        self.module = module.to(self.ctx.device)
        self.wrapped, self.average = self.wrap(self.module, self.ctx)
        self.model = common.maybe_compile(self.wrapped, self.ctx.compile)
        self.params = list(self.module.parameters())
        self.optimizer = make_optimizer(self.params, fused=self.ctx.device.type == "cuda")

    def sync(self, enabled: bool):
        # DDP: accumulation micro-steps keep gradients local; only the last one all-reduces
        if enabled or not isinstance(self.wrapped, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def autocast(self):
        return common.autocast(self.ctx.device, self.ctx.precision)

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, grad_clip, want_norm=True):
        if self.average is not None:
            self.average()
        # replicas hold identical gradients after the all-reduce: a local finiteness check agrees on every rank
        return common.optimizer_step(self.optimizer, self.params, grad_clip, self.scaler, want_norm)

    def full_model_state(self) -> dict:
        return self.module.state_dict()

    def save(self, path) -> None:
        if self.ctx.env.is_main:  # replicas are identical: one writer
            common.save_full(path, self.module, self.optimizer, self.scaler)

    def load(self, path) -> None:
        common.load_full(path, self.module, self.optimizer, self.scaler, self.ctx.device)
