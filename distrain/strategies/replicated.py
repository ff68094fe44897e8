"""Strategies that keep a full model replica per process: `single`, `dp`
(nn.DataParallel) and `ddp`. They differ only in how the module is wrapped, so one
class takes the wrapping as a function instead of three classes copying each other."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from . import common

log = logging.getLogger("distrain")


def single(ctx) -> Replicated:
    return Replicated(ctx, lambda module: (module, None))


def data_parallel(ctx) -> Replicated:
    def wrap(module):
        if ctx.device.type == "cuda" and torch.cuda.device_count() > 1:
            return nn.DataParallel(module), None
        log.warning("strategy dp: fewer than 2 GPUs visible, running as a single process on %s", ctx.device)
        return module, None

    return Replicated(ctx, wrap)


def ddp(ctx) -> Replicated:
    def wrap(module):
        """The model to run and, where no DDP wrapper averages the gradients during backward, the
        function that averages them before the optimizer step."""
        if ctx.env.world_size == 1:  # nothing to all-reduce; DDP would still pay a collective per step
            return module, None
        if ctx.comm.host is not None:  # every rank on this machine's CPU: shared memory instead of gloo
            from . import shm_allreduce

            wrapped = shm_allreduce.wrap(module, ctx.comm.host)
            if wrapped is not None:
                return wrapped
        return DistributedDataParallel(module, device_ids=[ctx.device] if ctx.device.type == "cuda" else None), None

    return Replicated(ctx, wrap)


class Replicated:
    def __init__(self, ctx, wrap):
        self.ctx, self.wrap = ctx, wrap
        self.scaler = common.grad_scaler(ctx.device, ctx.precision)

    def setup(self, module, make_optimizer, init=None) -> None:
        self.module = module.to(self.ctx.device)
        self.wrapped, self.average = self.wrap(self.module)
        self.model = common.maybe_compile(self.wrapped, self.ctx.compile)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, fused=self.ctx.device.type == "cuda")

    def micro_step(self, sync: bool):
        # DDP: accumulation micro-steps keep gradients local; only the last one all-reduces
        if sync or not isinstance(self.wrapped, DistributedDataParallel):
            return common.autocast(self.ctx.device, self.ctx.precision)  # no generator frame per step
        return self._local_micro_step()

    @contextlib.contextmanager
    def _local_micro_step(self):
        with self.wrapped.no_sync(), common.autocast(self.ctx.device, self.ctx.precision):
            yield

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, grad_clip, grad_scale=None):
        if self.average is not None:
            self.average()
        # replicas hold identical gradients after the all-reduce: a local finiteness check agrees on every rank
        return common.optimizer_step(self.optimizer, self.params, grad_clip, self.scaler, grad_scale)

    def full_state(self) -> dict:
        return self.module.state_dict()

    def save(self, path, blocking=True) -> None:
        if self.ctx.env.is_main:  # replicas are identical: one writer
            common.save_full(path, self.module, self.optimizer, self.scaler)

    def load(self, path) -> None:
        common.load_full(path, self.module, self.optimizer, self.scaler, self.ctx.device)
