"""The DeepSpeed strategy's world-size-free state (universal.pt): per-parameter fp32 master
weights and optimizer state, whole, with the few counters DeepSpeed's own checkpoint would
restore. Any world size reads it; a model with frozen parameters keeps only this file."""
from __future__ import annotations

import torch

# the entries of universal.pt that are not per-parameter optimizer state
META = ("world_size", "step", "params", "buffers", "engine", "loss_scaler")
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def gather(strategy) -> dict:
    """Collective (ZeRO partitions are gathered); every rank returns the whole state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer, masters = strategy.optimizer, own_masters(strategy)
    keys = optimizer_state_keys(optimizer)
    out = {"world_size": strategy.ctx.env.world_size, "step": optimizer_step(optimizer), "params": {},
           **{k: {} for k in keys}, "buffers": persistent_buffers(strategy.module),
           "engine": {k: getattr(strategy.engine, k) for k in ENGINE_COUNTERS},
           "loss_scaler": scalars(loss_scaler(strategy.engine.optimizer))}
    for name, p in trainable(strategy.module).items():
        master = masters.get(p)
        out["params"][name] = (master.detach() if master is not None else safe_get_full_fp32_param(p)).float().cpu()
        for k in keys:
            out[k][name] = (optimizer.state[master][k] if master is not None else safe_get_full_optimizer_state(p, k)).cpu()
    return out


def scatter(strategy, universal: dict) -> None:
    """This rank's share of `universal` into the fp32 masters, the optimizer state and the
    compute copy of the weights; collective under ZeRO-3."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    keys = [k for k in universal if k not in META]
    materialize_optimizer_state(strategy, keys, universal["step"])
    params, masters = trainable(strategy.module), own_masters(strategy)
    device = strategy.ctx.device
    for name, p in params.items():
        for k in [None, *keys]:
            value = universal["params" if k is None else k][name].to(device)
            master = masters.get(p)
            if hasattr(p, "ds_id"):
                _set_zero3_partition(p, value, k)
            elif master is not None:
                (master.data if k is None else strategy.optimizer.state[master][k]).copy_(value.reshape(p.shape))
            elif k is None:
                safe_set_full_fp32_param(p, value)
            else:
                safe_set_full_optimizer_state(p, value, k)
    # the compute copy of the weights follows the fp32 master (the same rounding a step applies)
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                           enabled=strategy.ctx.section.zero_stage == 3), torch.no_grad():
        for name, p in params.items():
            p.data.copy_(universal["params"][name].to(p.device, p.dtype).reshape(p.shape))
    buffers = dict(strategy.module.named_buffers())
    for name, value in universal.get("buffers", {}).items():
        buffers[name].data.copy_(value)
    for k, value in universal.get("engine", {}).items():
        setattr(strategy.engine, k, value)
    scaler = loss_scaler(strategy.engine.optimizer)
    for k, value in universal.get("loss_scaler", {}).items():
        setattr(scaler, k, value)


def own_masters(strategy) -> dict:
    """{parameter: the fp32 tensor the torch optimizer steps for it} where DeepSpeed keeps them
    unpartitioned: the parameter itself (ZeRO-0 in fp32), or the fp32 copies ZeRO-0's 16-bit
    wrapper holds beside the compute weights. ZeRO 1-3 masters are reached through DeepSpeed's
    safe_get/set functions instead."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if strategy.bare:
        return {p: p for p in trainable(strategy.module).values()}
    wrapper = strategy.engine.optimizer
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        return {lp: hp for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups) for lp, hp in zip(lps, hps)}
    return {}


def trainable(module) -> dict:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def persistent_buffers(module) -> dict:
    names = {name for name, _ in module.named_buffers()}
    return {k: v.detach().cpu() for k, v in module.state_dict().items() if k in names}


def loss_scaler(wrapper):
    """The (fp16) loss scale's state holder: ZeRO's scaler object or ZeRO-0's scale config."""
    return getattr(wrapper, "loss_scaler", None) or getattr(wrapper, "loss_scale_config", None)


def scalars(obj) -> dict:
    """The plain numbers of an object (a loss scaler's scale, counters, hysteresis)."""
    if obj is None:
        return {}
    return {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float))}


def materialize_optimizer_state(strategy, keys: list[str], step: int) -> None:
    """torch optimizers create their state at the first step; a resumed run must have it before
    that, on the fp32 tensors DeepSpeed hands to the optimizer (flat partitions under ZeRO)."""
    zero, masters = strategy.engine.optimizer, own_masters(strategy)
    flats = list(masters.values()) if masters else (
        getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups)
    for flat in flats:
        state = strategy.optimizer.state[flat]
        for k in keys:
            state[k] = torch.zeros_like(flat)
        state["step"] = torch.tensor(float(step))
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 link per-parameter views lazily
        zero._lazy_init_hp_params_optimizer_state()


def optimizer_state_keys(optimizer) -> list[str]:
    for state in optimizer.state.values():
        return sorted(k for k, v in state.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0)
    return []


def optimizer_step(optimizer) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _set_zero3_partition(param, value, key) -> None:
    """This rank's slice of a full tensor into ZeRO-3's fp32 partition. DeepSpeed's own setter
    overruns when the last rank's partition is padded (numel not divisible by the world size)."""
    zero = param._z3_optimizer
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * zero._get_param_partition_rank(param)
    chunk = value.flatten()[start : start + part.numel()]
    part.data.zero_()
    part.data[: chunk.numel()].copy_(chunk)
