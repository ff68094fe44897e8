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


def optimizer_step(optimizer, params: list, grad_clip: float | None, scaler=None) -> float:
    """Clip, then step unless the gradient norm is non-finite; always leaves grads cleared.

    Returns the pre-clip global gradient norm (inf/nan when the step was skipped). The
    norm is needed every step anyway, for the non-finite guard.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    norm = total_norm(grads)
    if grad_clip:
        nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], grad_clip, norm)
    value = norm.item()
    if scaler is not None:
        scaler.step(optimizer)  # GradScaler skips on inf itself and lowers its scale
        scaler.update()
    elif math.isfinite(value):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


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

    state = safe_load(path / "model.pt", map_location=device)
    module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
