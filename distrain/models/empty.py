"""Models built without their parameters' memory: a model whose weights all come from a file,
under a strategy that shards it, never needs them whole on any rank. Its parameters are made
on the meta device (shapes only, no random initialisation); its buffers stay real, as the
build computed them, because a file does not hold the non-persistent ones (rotary frequencies,
masks) and nothing else would recompute them. After sharding, each rank allocates its shards
and reads them from the file.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

_building = threading.local()


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter a module registers inside this block is moved to the meta device (one
    tensor, never filled, at a time before it goes); a parameter already there (a tied weight
    assigned again) is kept as it is, so ties survive."""

    def to_meta(module, name, param):
        if param is None or param.is_meta:
            return None
        return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    handle = register_module_parameter_registration_hook(to_meta)
    _building.active = True
    try:
        yield
    finally:
        _building.active = False
        handle.remove()


def building_on_meta() -> bool:
    """Whether a builder runs inside parameters_on_meta (model.name=hf then builds from the
    config and leaves the weights to the load that follows)."""
    return getattr(_building, "active", False)


def has_meta_parameters(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate every parameter still on the meta device (after sharding, only each rank's
    shard), uninitialised: the caller fills them. The real tensors (buffers, parameters the
    build made for real, such as LoRA adapters) keep their values: to_empty replaces every
    tensor, so they are copied back into the new ones."""
    # detached: a view of the old storage, which to_empty may swap out from under the parameter
    real = {name: t.detach() for name, t in [*module.named_parameters(), *module.named_buffers()] if not t.is_meta}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name in real:
                t.copy_(real[name])


def build_for_run(build, model_section, checkpoint_section, checkpoints_root, empty: bool = True):
    """The model (`build(empty)` builds it) and its planned initial weights (None: nothing to load).
    A model whose every parameter a file fills is built with its parameters on the meta device
    (empty=True): a sharding strategy then allocates each rank's part only, and nobody pays for a
    random initialisation the file overwrites. It is built for real (from the
    same random state) when something is left unfilled: a resume that takes the checkpoint's
    weights, init_strict off with keys the file lacks, parameters a user's builder made itself
    (adapters), or a model.name=hf directory whose names differ from the model's (from_pretrained
    then maps them)."""
    from .. import weights

    if empty and weights.init_source(model_section, empty) is not None:
        rng = torch.random.get_rng_state()
        module = build(True)
        init = _plan_quietly(model_section, checkpoint_section, checkpoints_root, module)
        if init is not None and init.fills(module):
            return module, init
        torch.random.set_rng_state(rng)
    module = build(False)
    return module, weights.plan_for_run(model_section, checkpoint_section, checkpoints_root, module)


def _plan_quietly(model_section, checkpoint_section, checkpoints_root, module: nn.Module):
    """plan_for_run, where a model.name=hf directory's weights that do not match the model's names
    (an old layout, a checkpoint of another head) mean "build it for real" instead of an error."""
    from .. import weights
    from ..config import ConfigError

    try:
        return weights.plan_for_run(model_section, checkpoint_section, checkpoints_root, module)
    except ConfigError:
        if model_section.init_from is not None:
            raise
        return None
