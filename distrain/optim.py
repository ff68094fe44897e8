"""Optimizers and learning-rate schedules. The schedule is a pure function of the step, so
it needs no state of its own in a checkpoint and works the same under every strategy."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig, SchedConfig


def build_optimizer(cfg: OptimConfig, params, fused: bool = False) -> torch.optim.Optimizer:
    """fused: one kernel per step on a GPU, which can also skip a non-finite step on the device
    (strategies.common.optimizer_step); RMSprop has no fused form. Otherwise the multi-tensor
    (foreach) form, which torch picks by default only on GPUs: on the CPU it runs each
    operation over all parameters in one call instead of one Python call per parameter, with
    the same arithmetic (bit-identical weights, tested), at the cost of holding one step's
    intermediates for all parameters at once (up to one extra copy of the weights)."""
    params = list(params)
    extra = {"fused": True} if fused else {"foreach": True}
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **extra)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                **extra)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                                 **extra)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                   foreach=True)
    raise AssertionError(cfg.name)  # config validation rules this out


def lr_at(step: int, base_lr: float, cfg: SchedConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return base_lr
    if cfg.name == "step":
        return base_lr * cfg.gamma ** ((step - cfg.warmup_steps) // cfg.step_size)
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = base_lr * cfg.min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
