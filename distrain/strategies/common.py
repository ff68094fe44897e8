"""Pieces the torch-native strategies compose (no base class): autocast, the optimizer
step with clipping and the non-finite check, and plain-file model/optimizer checkpoints."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str):
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def optimizer_step(optimizer, params: list, grad_clip: float | None, scaler=None,
                   grad_scale: float | None = None) -> torch.Tensor:
    """Clip (or only measure), update unless a gradient is non-finite, clear the gradients.

    Returns the pre-clip global gradient norm as a 0-dim tensor, whatever the device; a
    non-finite norm means the update was not applied. The check reads the norm on the host:
    an optimizer step that might apply inf/NaN is worse than one host sync per step.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    if grad_scale is not None and grads:  # a loss whose item count was known only after the backward
        torch._foreach_mul_(grads, grad_scale)
    norm = total_norm(grads)
    if grad_clip:
        nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], grad_clip, norm)
    if scaler is not None:
        scaler.step(optimizer)  # GradScaler skips on inf itself and lowers its scale
        scaler.update()
    elif math.isfinite(norm.item()):  # torch.isfinite of one number is four kernels (~15 us on a CPU)
        optimizer.step()
    clear_grads(optimizer)
    return norm.detach()


def clear_grads(optimizer) -> None:
    """zero_grad(set_to_none=True) without its profiler range, which costs more than the loop
    itself on a small model's CPU step (~40 us of ~1.5 ms)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def all_finite(tensors: list) -> bool:
    """Whether every tensor is finite: one fused isfinite-and-reduce per tensor group, one host read."""
    if not tensors:
        return True
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def total_norm(grads: list) -> torch.Tensor:
    """The global L2 norm of the gradients (over all shards under FSDP2), as a 0-dim float32 tensor."""
    if not grads:
        return torch.zeros(())
    first = grads[0]
    if type(first) is torch.Tensor and all(type(g) is torch.Tensor and g.device == first.device
                                           and g.dtype == first.dtype for g in grads):
        # one device and dtype, no DTensor (the common case): the same fused kernel and sum that
        # get_total_norm computes, the same bits, without its per-call grouping of the tensors
        # (~30 us, 4% of a small model's CPU step); tests compare the two
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()
    norm = nn.utils.get_total_norm(grads)
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).float()


def maybe_compile(module: nn.Module, enabled: bool) -> nn.Module:
    return torch.compile(module) if enabled else module


def save_full(path: Path, module: nn.Module, optimizer, scaler) -> None:
    """The whole model and optimizer state as one plain file (tensors and containers only)."""
    state = {"model": without_frozen(module.state_dict(), module), "optimizer": optimizer.state_dict()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    torch.save(state, path / "model.pt")


def load_full(path: Path, module: nn.Module, optimizer, scaler, device) -> None:
    from ..checkpoint_io import safe_load

    # on the CPU: read once, into memory the model and optimizer then keep; for another device
    # the file is mapped, and copied from the page cache straight to the device
    state = safe_load(path / "model.pt", mmap=device.type != "cpu")
    adopt_tensors(module, state["model"])
    load_model_state(module, state["model"])
    optimizer.load_state_dict(state["optimizer"])  # on the parameters' device and dtype it keeps them as given
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])


def frozen_names(module: nn.Module) -> set[str]:
    """Parameters that do not train. Checkpoints leave them out: the model's build (with
    model.init_from) restores them, which keeps a LoRA checkpoint the size of its adapters."""
    return {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}


def without_frozen(state: dict, module: nn.Module) -> dict:
    frozen = frozen_names(module)
    return {k: v for k, v in state.items() if k not in frozen} if frozen else state


def load_model_state(module: nn.Module, state: dict) -> None:
    """load_state_dict, where only the frozen parameters may be absent."""
    frozen = frozen_names(module)
    result = module.load_state_dict(state, strict=not frozen)
    absent = [k for k in result.missing_keys if k not in frozen]
    if absent or result.unexpected_keys:
        raise RuntimeError(f"the checkpoint's model does not match: missing {absent[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")


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
