"""DeepSpeed ZeRO stages 0-3 with optional CPU offload. deepspeed is imported only here,
and only when this strategy is chosen."""
from __future__ import annotations

import contextlib

from . import common


def deepspeed_config(ctx) -> dict:
    cfg = ctx.cfg
    zero: dict = {"stage": cfg.strategy.zero_stage}
    if cfg.strategy.zero_stage == 3:
        zero["overlap_comm"] = False  # distrain owns the accumulation boundary (see setup)
    if cfg.strategy.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.strategy.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": ctx.micro_batch,
        "gradient_accumulation_steps": ctx.accumulation,
        # distrain decides where an optimizer step ends: the last micro-batch of an epoch's
        # short final batch comes earlier than a fixed count would say
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.train.grad_clip or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": ctx.precision == "bf16"},
        "fp16": {"enabled": ctx.precision == "fp16"},
        # a torch optimizer is passed in: offload must not swap it for DeepSpeedCPUAdam, which compiles C++
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, cfg.strategy.deepspeed)


class DeepSpeed:
    name = "deepspeed"

    def __init__(self, ctx):
        self.ctx = ctx

    def setup(self, module, make_optimizer) -> None:
        import deepspeed

        if self.ctx.device.type == "cpu":
            # the shared-memory comm op JIT-compiles C++ for ~30 s on first use; gloo does the job
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=self.ctx.backend, verbose=False)
        module.to(self.ctx.device)
        self.optimizer = make_optimizer(module.parameters())
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, config=deepspeed_config(self.ctx), dist_init_required=False)
        self.module = self.engine.module
        self.model = common.maybe_compile(self.engine, self.ctx.compile)

    def sync(self, enabled: bool):
        return contextlib.nullcontext()  # reductions happen at engine.step(), the boundary

    def autocast(self):
        # bf16/fp16 engines hold half-precision weights; autocast casts fp32 inputs to match
        return common.autocast(self.ctx.device, self.ctx.precision)

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already normalised the loss

    def step(self, grad_clip):
        import torch

        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return torch.tensor(float("nan") if norm is None else float(norm))

    def full_model_state(self) -> dict:
        if self.ctx.cfg.strategy.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return {k: v.float() if v.is_floating_point() else v for k, v in self.module.state_dict().items()}

    def save(self, path) -> None:
        self.engine.save_checkpoint(str(path / "deepspeed"), tag="state")  # every rank writes its partition

    def load(self, path) -> None:
        self.engine.load_checkpoint(str(path / "deepspeed"), tag="state")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
