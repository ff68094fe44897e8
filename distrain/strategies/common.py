"""Pieces the torch-native strategies compose (no base class): autocast, the optimizer
step with clipping and the non-finite check, and plain-file model/optimizer checkpoints."""
from __future__ import annotations

import contextlib
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


def optimizer_step(optimizer, params, grad_clip: float | None, scaler=None) -> torch.Tensor:
    """Clip, then step unless the gradient norm is non-finite; always leaves grads cleared.

    Returns the pre-clip global gradient norm (inf/nan when the step was skipped). The
    norm is needed every step anyway, for the non-finite guard.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for p in params if p.grad is not None]
    norm = nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2: the norm over all shards
        norm = norm.full_tensor()
    if grad_clip:
        nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
    if scaler is not None:
        scaler.step(optimizer)  # GradScaler skips on inf itself and lowers its scale
        scaler.update()
    elif torch.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.detach()


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
