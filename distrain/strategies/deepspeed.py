"""DeepSpeed ZeRO stages 0-3 with optional CPU offload. deepspeed is imported only here,
and only when this strategy is chosen."""
from __future__ import annotations

import contextlib
import logging

import torch

from . import common, deepspeed_state


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

    def setup(self, module, make_optimizer, init=None) -> None:
        import deepspeed

        from ..cluster import export_for_libraries
        from ..log import adopt_library_logger

        adopt_library_logger("DeepSpeed")
        export_for_libraries(self.ctx.env)
        if self.ctx.device.type == "cpu":
            # the shared-memory comm op JIT-compiles C++ for ~30 s on first use; gloo does the job
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=self.ctx.backend, verbose=False)
        config = deepspeed_config(self.ctx)
        if init is not None:  # ZeRO-3, built on the meta device
            partition_from_files(module, init, config, self.ctx.device, common.AMP_DTYPES.get(self.ctx.precision))
        else:
            module.to(self.ctx.device)
        self.optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
        self.engine, *_ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, config=config, dist_init_required=False)
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
            divisor = getattr(self.engine.optimizer, "loss_scale", 1.0)  # what the step divides the gradients by
            self.engine.step()
        norm = self.engine.get_global_grad_norm()  # inf when DeepSpeed skipped a non-finite step
        if norm is not None and not self.ctx.section.zero_stage:  # ZeRO-0's 16-bit wrapper measures before it divides
            norm = norm / divisor
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
        universal = deepspeed_state.gather(self)  # collective
        if not common.frozen_names(self.module):
            self._save_own(path)
        if self.ctx.env.is_main:
            (path / "deepspeed").mkdir(exist_ok=True)
            torch.save(universal, path / "deepspeed" / "universal.pt")

    def _save_own(self, path) -> None:
        """DeepSpeed's own files, a second copy of the state beside universal.pt: a model with frozen
        parameters (LoRA) goes without them, its checkpoint stays the size of what trains."""
        # every rank writes its partition; `latest` is not needed (loads name the tag), one write fewer to fail
        with writes_kept_in_step(self.engine.checkpoint_engine) as write_errors:
            try:
                self.engine.save_checkpoint(str(path / "deepspeed"), tag="state", save_latest=False)
            except OSError as e:  # a file it writes itself (a script copy): they come last, before the
                write_errors.append(e)  # final barrier the other ranks wait in
                torch.distributed.barrier()
        if write_errors:
            raise write_errors[0]

    def load(self, path) -> None:
        from ..checkpoint_io import safe_load

        universal = safe_load(path / "deepspeed" / "universal.pt")
        if (path / "deepspeed" / "state").is_dir() and universal["world_size"] == self.ctx.env.world_size:
            self.engine.load_checkpoint(str(path / "deepspeed"), tag="state",  # bitwise, DeepSpeed's own
                                        load_module_strict=not common.frozen_names(self.module))
        else:  # as bitwise on the same world size: the fp32 masters and the optimizer state, exactly
            deepspeed_state.scatter(self, universal)


def partition_from_files(module, init, config: dict, device, dtype) -> None:
    """ZeRO-3 parameters made from the init files without the whole model on any rank: one module's
    parameters at a time are read whole into one reused buffer and handed to zero.Init, which copies
    out this rank's partition (as if the model had been built under zero.Init). One buffer, not an
    allocation per tensor: freed large blocks would stay in the allocator's heap, fragmented, and
    the peak would grow with the model. Children come before their parents, so a module converts
    only its own parameters; a tied one, once."""
    import deepspeed

    sources, owners = init.sources(module), {}
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((sub, name))
    nbytes = lambda p: p.numel() * (dtype or p.dtype).itemsize  # noqa: E731
    aligned = lambda n: -(-n // 64) * 64  # noqa: E731 - each view starts 64-byte aligned
    largest = max((sum(aligned(nbytes(p)) for p in sub.parameters(recurse=False) if p.is_meta)
                   for sub in module.modules()), default=0)
    scratch = torch.empty(largest, dtype=torch.uint8, device=device)
    try:
        for sub in reversed(list(module.modules())):
            own = [p for p in sub.parameters(recurse=False) if p.is_meta]  # now: a tied one may be done
            if not own:
                continue
            offset = 0
            with torch.no_grad():
                for p in own:
                    view = scratch[offset : offset + nbytes(p)].view(dtype or p.dtype).view(p.shape)
                    real = torch.nn.Parameter(view, requires_grad=p.requires_grad)
                    init.files.read_into(real, sources[id(p)])
                    offset += aligned(nbytes(p))
                    for owner, name in owners[id(p)]:
                        setattr(owner, name, real)
            deepspeed.zero.Init(module=sub, config_dict_or_path=config, mem_efficient_linear=False)
    finally:
        init.files.close()  # not one descriptor per shard file held for the rest of the run
    logging.getLogger("distrain").info("model built on the meta device: each rank keeps its ZeRO-3 partitions only")


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
