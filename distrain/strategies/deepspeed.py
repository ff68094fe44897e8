"""DeepSpeed ZeRO stages 0-3 with optional CPU offload. deepspeed is imported only here,
and only when this strategy is chosen."""
from __future__ import annotations

import contextlib

import torch

from . import common


def deepspeed_config(ctx) -> dict:
    section = ctx.section
    zero: dict = {"stage": section.zero_stage}
    if section.zero_stage == 3:
        zero["overlap_comm"] = False  # distrain owns the accumulation boundary (see setup)
    if section.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu"}
    if section.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": ctx.global_batch,
        "train_micro_batch_size_per_gpu": ctx.micro_batch,
        "gradient_accumulation_steps": ctx.accumulation,
        # distrain decides where an optimizer step ends: the last micro-batch of an epoch's
        # short final batch comes earlier than a fixed count would say
        "managed_gradient_accumulation": False,
        # ZeRO-0 in fp32: distrain's own step clips, in place of the torch optimizer's (DeepSpeed.step)
        "gradient_clipping": 0.0 if section.zero_stage == 0 and ctx.precision == "fp32" else ctx.grad_clip or 0.0,
        "zero_optimization": zero,
        # a non-finite gradient norm skips the step (fp32 and fp16 do so already)
        "bf16": {"enabled": ctx.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": ctx.precision == "fp16"},
        # a torch optimizer is passed in: offload must not swap it for DeepSpeedCPUAdam, which compiles C++
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,  # torch's SGD and RMSprop shard like Adam
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, section.deepspeed)


class HalfInputs(torch.nn.Module):
    """DeepSpeed's bf16/fp16 engines hold 16-bit weights and turn autocast off around the module:
    floating-point inputs are cast to the weights' dtype, as DeepSpeed expects of its callers."""

    def __init__(self, engine, dtype: torch.dtype):
        super().__init__()
        self.engine, self.dtype = engine, dtype

    def forward(self, *inputs, **named):
        cast = lambda x: x.to(self.dtype) if torch.is_tensor(x) and torch.is_floating_point(x) else x  # noqa: E731
        return self.engine(*map(cast, inputs), **{k: cast(v) for k, v in named.items()})


class DeepSpeed:
    def __init__(self, ctx):
        self.ctx = ctx

    def setup(self, module, make_optimizer) -> None:
        import deepspeed

        from ..cluster import export_for_libraries
        from ..log import adopt_library_logger

        adopt_library_logger("DeepSpeed")
        export_for_libraries(self.ctx.env)
        if self.ctx.device.type == "cpu":
            # the shared-memory comm op JIT-compiles C++ for ~30 s on first use; gloo does the job
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=self.ctx.backend, verbose=False)
        module.to(self.ctx.device)
        self.optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, config=deepspeed_config(self.ctx), dist_init_required=False)
        self.module = self.engine.module
        self.bare = self.engine.optimizer is self.optimizer  # ZeRO-0 in fp32: the weights are their own master
        model = self.engine
        if self.ctx.precision in common.AMP_DTYPES:
            model = HalfInputs(self.engine, common.AMP_DTYPES[self.ctx.precision])
        self.model = common.maybe_compile(model, self.ctx.compile)

    def micro_step(self, sync: bool):
        # reductions happen at engine.step(), the boundary; bf16/fp16 engines hold half-precision
        # weights, and autocast casts fp32 inputs to match
        return common.autocast(self.ctx.device, self.ctx.precision)

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already normalised the loss

    def step(self, grad_clip, grad_scale=None):
        if self.bare:  # DeepSpeed would step with no norm and no non-finite check: distrain's plain step
            with checked_step(self.optimizer, grad_clip, grad_scale) as norms:
                self.engine.step()  # its gradient all-reduce, then the optimizer's step, then its bookkeeping
            return norms[0]
        with scaled_gradients(self.engine, grad_scale):
            self.engine.step()
        norm = self.engine.get_global_grad_norm()  # inf when DeepSpeed skipped a non-finite step
        return torch.tensor(float("nan") if norm is None else float(norm))

    def full_state(self) -> dict:
        """fp32 master weights (not the 16-bit compute copy), gathered over ranks; collective."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        state, gathered = {}, {}
        # a tied weight (an embedding reused as the output head) goes out under each of its names,
        # as the module's own state_dict has it; it is gathered once
        for name, p in self.module.named_parameters(remove_duplicate=False):
            if id(p) not in gathered:
                full = safe_get_full_fp32_param(p)
                if full is None and hasattr(p, "ds_id"):  # frozen under ZeRO-3: no fp32 master, only partitions
                    with deepspeed.zero.GatheredParameters([p]):
                        full = p.detach().clone()
                gathered[id(p)] = (full if full is not None else p.detach()).float().cpu().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
            state[name] = gathered[id(p)]
        for name, b in self.module.named_buffers():
            state[name] = b.detach().cpu()
        return {k: state[k] for k in self.module.state_dict() if k in state}

    def save(self, path, blocking=True) -> None:
        # every rank writes its partition; `latest` is not needed (loads name the tag), one write fewer to fail
        with writes_kept_in_step(self.engine.checkpoint_engine) as write_errors:
            try:
                # frozen parameters are left out: the model's build restores them
                self.engine.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False,
                                            exclude_frozen_parameters=bool(common.frozen_names(self.module)))
            except OSError as e:  # a file it writes itself (a script copy): they come last, before the
                write_errors.append(e)  # final barrier the other ranks wait in
                torch.distributed.barrier()
        universal = self._gather_universal()  # collective
        if write_errors:
            raise write_errors[0]
        if self.ctx.env.is_main:
            torch.save(universal, path / "deepspeed" / "universal.pt")

    def load(self, path) -> None:
        from ..checkpoint_io import safe_load

        universal = safe_load(path / "deepspeed" / "universal.pt")
        if universal["world_size"] == self.ctx.env.world_size:
            self.engine.load_checkpoint(str(path / "deepspeed"), tag="state",  # bitwise, DeepSpeed's own
                                        load_module_strict=not common.frozen_names(self.module))
        else:
            self._scatter_universal(universal)

    def _gather_universal(self) -> dict:
        """Per-parameter fp32 weights and optimizer state, whole: readable by any world size."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        keys = self._optimizer_state_keys()
        out = {"world_size": self.ctx.env.world_size, "step": self._optimizer_step(), "params": {},
               **{k: {} for k in keys}}
        full_param = (lambda p: p.detach()) if self.bare else safe_get_full_fp32_param
        full_state = (lambda p, k: self.optimizer.state[p][k]) if self.bare else safe_get_full_optimizer_state
        for name, p in self._trainable().items():
            out["params"][name] = full_param(p).cpu()
            for k in keys:
                out[k][name] = full_state(p, k).cpu()
        return out

    def _scatter_universal(self, universal: dict) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        keys = [k for k in universal if k not in ("world_size", "step", "params")]
        self._materialize_optimizer_state(keys, universal["step"])
        params = self._trainable()
        device = self.ctx.device
        for name, p in params.items():
            for k in [None, *keys]:
                value = universal["params" if k is None else k][name].to(device)
                if hasattr(p, "ds_id"):
                    _set_zero3_partition(p, value, k)
                elif k is None:
                    safe_set_full_fp32_param(p, value)  # bare: nothing, the copy below sets the master itself
                elif self.bare:
                    self.optimizer.state[p][k].copy_(value.reshape(p.shape))
                else:
                    safe_set_full_optimizer_state(p, value, k)
        # the compute copy of the weights follows the fp32 master
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0,
                                               enabled=self.ctx.section.zero_stage == 3):
            with torch.no_grad():
                for name, p in params.items():
                    p.data.copy_(universal["params"][name].to(p.device, p.dtype).reshape(p.shape))

    def _trainable(self) -> dict:
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}

    def _materialize_optimizer_state(self, keys: list[str], step: int) -> None:
        """torch optimizers create their state at the first step; a resumed run must have it before
        that, on the flat fp32 partitions DeepSpeed hands to the optimizer."""
        zero = self.engine.optimizer
        flats = list(self._trainable().values()) if self.bare else (
            getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(zero, "single_partition_of_fp32_groups"))
        for flat in flats:
            state = self.optimizer.state[flat]
            for k in keys:
                state[k] = torch.zeros_like(flat)
            state["step"] = torch.tensor(float(step))
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2 link per-parameter views lazily
            zero._lazy_init_hp_params_optimizer_state()

    def _optimizer_state_keys(self) -> list[str]:
        for state in self.optimizer.state.values():
            return sorted(k for k, v in state.items() if k != "step" and torch.is_tensor(v) and v.dim() > 0)
        return []

    def _optimizer_step(self) -> int:
        for state in self.optimizer.state.values():
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


@contextlib.contextmanager
def checked_step(optimizer, grad_clip: float | None, grad_scale: float | None):
    """Inside this block optimizer.step() is distrain's plain step (rescale, norm, clip, update only when
    finite, clear) on the gradients the engine has all-reduced; the yielded list receives its norm."""
    norms, own_step, params = [], optimizer.step, [p for group in optimizer.param_groups for p in group["params"]]

    def step(*args, **kwargs):
        optimizer.step = own_step  # common.optimizer_step calls the optimizer's own
        norms.append(common.optimizer_step(optimizer, params, grad_clip, grad_scale=grad_scale))

    optimizer.step = step
    try:
        yield norms
    finally:
        vars(optimizer).pop("step", None)  # the class's step again


@contextlib.contextmanager
def scaled_gradients(engine, factor: float | None):
    """Gradients multiplied by `factor` in the step, before DeepSpeed clips and measures them.
    ZeRO optimizers hold the reduced gradients in their own partitions and divide them by the
    loss scale there (the fp16 loss-scaling protocol, `loss_scale` settable on purpose): dividing
    by scale / factor multiplies by factor, and the norm and clipping see the scaled gradient.
    Without ZeRO the gradients are the parameters' own."""
    if factor is None:
        yield
        return
    zero = engine.optimizer
    if not hasattr(zero, "loss_scale"):
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)
        yield
        return
    before = zero.loss_scale
    zero.loss_scale = before / factor
    try:
        yield
    finally:  # a dynamic fp16 scale may have moved in the step: keep its move, drop our factor
        after = zero.loss_scale
        zero.loss_scale = before if after == before / factor else after * factor


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@contextlib.contextmanager
def writes_kept_in_step(checkpoint_engine):
    """DeepSpeed's save_checkpoint has barriers between its writes: a rank whose write fails (a full
    disk) and leaves it early would leave the others waiting there. Inside this block a failed write
    is recorded in the yielded list and the rank's later writes are skipped, so every rank walks
    through the same collectives; the caller raises the failure afterwards."""
    failures, save = [], checkpoint_engine.save

    def save_or_record(*args, **kwargs):
        if failures:
            return None
        try:
            return save(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised by the caller once the collectives are done
            failures.append(e)
            return None

    checkpoint_engine.save = save_or_record
    try:
        yield failures
    finally:
        del checkpoint_engine.save  # the engine's own method again
