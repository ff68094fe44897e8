"""Pieces the torch-native strategies compose (no base class): autocast, the optimizer
step with clipping and the non-finite check, and plain-file model/optimizer checkpoints."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn
from torch.optim import optimizer as torch_optimizer

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str):
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def optimizer_step(optimizer, params: list, grad_clip: float | None, scaler=None, want_norm: bool = True):
    """Clip, then step unless a gradient is non-finite; always leaves grads cleared.

    Returns the pre-clip global gradient norm when it was computed (clipping, or want_norm),
    None when the update was applied without it, and a non-finite value when the step was
    skipped. Without clipping, the non-finite check is one fused pass over the gradients
    instead of a norm: the norm is only needed on the steps that log it.

    A fused optimizer on a GPU skips a non-finite step itself, as under GradScaler: then the
    result is the device flag (1.0: skipped), for the caller to read when it syncs anyway.
    Reading it here would stall the host on the GPU every step.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    if scaler is None and not want_norm and skips_on_device(optimizer, grads):
        return _step_unless_nonfinite(optimizer, params, grads, grad_clip)
    if grad_clip or want_norm:
        norm = total_norm(grads)
        if grad_clip:
            nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], grad_clip, norm)
        value = norm.item()
        finite = math.isfinite(value)
    else:
        value, finite = None, all_finite(grads)
    if scaler is not None:
        scaler.step(optimizer)  # GradScaler skips on inf itself and lowers its scale
        scaler.update()
    elif finite:
        unobserved_step(optimizer)
    clear_grads(optimizer)
    return value if finite or value is not None else math.nan


def clear_grads(optimizer) -> None:
    """optimizer.zero_grad(set_to_none=True), which is exactly this loop inside a profiler range
    and a dynamo guard; those cost more than the loop (tens of microseconds a step on a CPU,
    where the model's kernels have just evicted their code from the caches)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def unobserved_step(optimizer) -> None:
    """optimizer.step(), skipping what torch wraps around every step (a profiler range and the
    step-hook dispatch) when nothing is there to see it: no profiler running, no hooks. What
    runs is the same update function, under the same no-grad wrapper."""
    step = type(optimizer).step
    update = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    # an attribute this torch does not have counts as an observer: then the plain step runs
    observers = [getattr(optimizer, "_optimizer_step_pre_hooks", True),
                 getattr(optimizer, "_optimizer_step_post_hooks", True),
                 getattr(torch_optimizer, "_global_optimizer_pre_hooks", True),
                 getattr(torch_optimizer, "_global_optimizer_post_hooks", True)]
    profiling = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)
    if update is None or any(observers) or profiling():
        optimizer.step()
    else:
        update(optimizer)


def skips_on_device(optimizer, grads: list) -> bool:
    return (bool(grads) and grads[0].device.type == "cuda" and len({g.device for g in grads}) == 1
            and all(group.get("fused") for group in optimizer.param_groups))


def _step_unless_nonfinite(optimizer, params: list, grads: list, grad_clip: float | None) -> torch.Tensor:
    if grad_clip:
        norm = total_norm(grads)
        nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], grad_clip, norm)
        found = torch.logical_not(torch.isfinite(norm)).float()
    else:
        found = nonfinite_flag(grads)
    optimizer.grad_scale, optimizer.found_inf = None, found  # what fused kernels read (GradScaler's protocol)
    try:
        unobserved_step(optimizer)
    finally:
        del optimizer.grad_scale, optimizer.found_inf
    clear_grads(optimizer)
    return found


_ONES: dict = {}
_FOUND: dict = {}  # per device, a flag kept at 0.0 between checks


def nonfinite_flag(grads: list, found: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 if any gradient (all on one device) holds an inf or NaN, else 0.0; no host sync."""
    device = grads[0].device
    if device not in _ONES:
        _ONES[device] = torch.ones(1, device=device)
    if found is None:
        found = torch.zeros((), device=device)  # 0-dim, as GradScaler makes it
    for group in grouped(grads, "dtype"):
        if group[0].dtype in SCALER_DTYPES:  # GradScaler's fused check, unscaling by exactly 1
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, _ONES[device])
        else:
            torch.maximum(found, nonfinite_any(group).to(found.dtype), out=found)
    return found


# what GradScaler's kernel takes on every device: on CUDA it has no bfloat16 (FSDP's and
# DeepSpeed's 16-bit weights are bfloat16 when the checkpoint checks them)
SCALER_DTYPES = (torch.float16, torch.float32, torch.float64)


def nonfinite_any(tensors: list) -> torch.Tensor:
    """A 0-dim bool: whether any of the tensors holds an inf or NaN (a check per tensor)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).logical_not().any()


def grouped(tensors: list, attribute: str) -> list[list]:
    """The tensors grouped by an attribute (device, dtype), in first-seen order; one group, the
    list itself, when they all share it (the common case, checked without building a dict)."""
    if not tensors:
        return []
    first = getattr(tensors[0], attribute)
    if all(getattr(t, attribute) == first for t in tensors):
        return [tensors]
    groups: dict = {}
    for t in tensors:
        groups.setdefault(getattr(t, attribute), []).append(t)
    return list(groups.values())


def all_finite(grads: list) -> bool:
    """Whether every gradient is finite: GradScaler's fused check, unscaling by exactly 1, into
    a flag reused between calls (reset only after it was raised) since this runs every step."""
    finite = True
    for group in grouped(grads, "device"):
        device = group[0].device
        if device not in _FOUND:
            _FOUND[device] = torch.zeros((), device=device)
        found = _FOUND[device]
        if nonfinite_flag(group, found).item():
            found.zero_()
            finite = False
    return finite


def total_norm(grads: list) -> torch.Tensor:
    """The global L2 norm of the gradients (over all shards under FSDP2)."""
    if not grads:
        return torch.zeros(())
    if any(hasattr(g, "full_tensor") for g in grads):
        norm = nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    # one fused kernel per dtype/device group; get_total_norm's grouping costs more than the math here
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    return torch.compile(module) if enabled else module


def save_full(path: Path, module: nn.Module, optimizer, scaler) -> None:
    """The whole model and optimizer state as one plain file (tensors and containers only)."""
    state = {"model": module.state_dict(), "optimizer": optimizer.state_dict()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    torch.save(state, path / "model.pt")


def load_full(path: Path, module: nn.Module, optimizer, scaler, device) -> None:
    from ..checkpoint_io import safe_load

    # on the CPU: read once, into memory the model and optimizer then keep; for another device
    # the file is mapped, and copied from the page cache straight to the device
    state = safe_load(path / "model.pt", mmap=device.type != "cpu")
    adopt_tensors(module, state["model"])
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])  # on the parameters' device and dtype it keeps them as given
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])


def adopt_tensors(module: nn.Module, state: dict) -> None:
    """Let parameters and buffers take the loaded tensors' memory where it already matches (same
    device, dtype and layout) instead of copying it: load_state_dict's copy then finds the same
    data and returns at once. The Parameter objects stay the same, so optimizers and wrappers
    that hold them see the loaded values."""
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        loaded = state.get(name)
        if (torch.is_tensor(loaded) and loaded.device == tensor.device and loaded.dtype == tensor.dtype
                and loaded.shape == tensor.shape and loaded.stride() == tensor.stride()):
            tensor.data = loaded
