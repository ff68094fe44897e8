"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.
Checkpoints are sharded DCP directories, which reshard on load to any world size."""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..config import ConfigError
from ..models.blocks import block_class_names, find_blocks, unknown_class_names
from ..models.empty import has_meta_parameters, materialize
from . import common


def shard_units(module: nn.Module, block_classes: list | None = None) -> list[nn.Module]:
    """Sub-modules sharded on their own so their all-gathers overlap compute: the blocks of the
    named classes (strategy.fsdp_blocks), else a Hugging Face model's _no_split_modules, else
    the built-in models' transformer blocks or ResNet stages; the root takes the rest."""
    missing = unknown_class_names(module, block_classes or ())
    if missing:
        raise ConfigError("strategy.fsdp_blocks", f"{type(module).__name__} has no sub-module of class "
                                                  f"{', '.join(missing)}")
    names = list(block_classes or ()) or block_class_names(module)
    if names:
        return find_blocks(module, names)
    if isinstance(getattr(module, "blocks", None), nn.ModuleList):
        return list(module.blocks)
    return [getattr(module, f"layer{i}") for i in range(1, 5) if hasattr(module, f"layer{i}")]


class Fsdp:
    def __init__(self, ctx):
        self.ctx = ctx

    def setup(self, module, make_optimizer, init=None) -> None:
        empty = has_meta_parameters(module)  # built for a file to fill: sharded first, then allocated
        if not empty:
            module.to(self.ctx.device)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.ctx.precision == "bf16" else MixedPrecisionPolicy()
        for unit in shard_units(module, self.ctx.section.fsdp_blocks):
            fully_shard(unit, mp_policy=mp)
        fully_shard(module, mp_policy=mp)
        if empty:  # each rank allocates its shards only and reads their slices
            materialize(module, self.ctx.device)
            init.load(module)
            logging.getLogger("distrain").info("model built on the meta device: each rank allocated its shards only")
        self.module = module
        self.model = common.maybe_compile(module, self.ctx.compile)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params)
        # background checkpoint writes plan over their own group, never interleaving with training collectives
        async_save = self.ctx.async_save
        self.checkpoint_group = torch.distributed.new_group(backend="gloo") if async_save else None
        self.stager = staging_for(self.ctx.device) if async_save else None

    @contextlib.contextmanager
    def micro_step(self, sync: bool):
        # accumulation micro-steps skip the reduce-scatter; the last one does it. No autocast: the
        # mixed-precision policy casts the parameters itself
        self.module.set_requires_gradient_sync(sync)
        yield

    def backward(self, loss) -> None:
        loss.backward()

    def step(self, grad_clip, grad_scale=None):
        # the norm over all shards is how the ranks agree on skipping a non-finite step
        return common.optimizer_step(self.optimizer, self.params, grad_clip, grad_scale=grad_scale)

    def full_state(self) -> dict:
        """The unsharded state on rank 0 (others get an empty dict); every rank must call it."""
        return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(self, path, blocking=True):
        """Sharded DCP files. blocking=False stages the state in CPU memory (training waits only for
        this) and writes it in the background: the returned future completes when the files are written."""
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        model_state = common.without_frozen(model_state, self.module)
        state, where = {"model": model_state, "optim": optim_state}, str(path / "dcp")
        if blocking:
            dcp.save(state, checkpoint_id=where)
            return None
        return dcp.async_save(state, checkpoint_id=where, process_group=self.checkpoint_group,
                              async_stager=self.stager)

    def load(self, path) -> None:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": common.without_frozen(model_state, self.module), "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path / "dcp"))  # any key the checkpoint lacks is an error here
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=not common.frozen_names(self.module)))


def staging_for(device: torch.device):
    """The copy async saves write from, kept between checkpoints: allocating (and, on GPUs,
    pinning) a fresh copy of the whole state at every save costs more than the copy itself."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = device.type == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                                        use_non_blocking_copy=cuda))
