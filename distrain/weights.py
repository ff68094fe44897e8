"""Weights in from the formats others use (the way out is distrain.export).

`model.init_from` names a Hugging Face directory (model.safetensors, or shards listed in
model.safetensors.index.json), a .safetensors file, or a .pt / .bin state_dict. The
safetensors files are read tensor by tensor; a parameter sharded over ranks (an FSDP2
DTensor) reads only its own slice, so no rank holds the whole model's weights twice.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .models.empty import has_meta_parameters

from .weight_files import INIT_KEY, WeightFiles

SHOWN_KEYS = 3  # how many missing / unexpected key names an error lists


def fresh_start(checkpoint_section, checkpoints_root: Path) -> bool:
    """Whether this launch starts from scratch: a resume takes the checkpoint's weights instead."""
    from .checkpoint import committed_steps

    resume = checkpoint_section.resume
    return resume == "never" or (resume == "auto" and not committed_steps(checkpoints_root))


def init_source(model_section, sharded: bool) -> str | None:
    """Where the initial weights come from: model.init_from, else, under a strategy that loads
    them sharded, the weights in a model.name=hf directory (its builder otherwise reads them whole)."""
    if model_section.init_from is not None:
        return model_section.init_from
    path = model_section.args.get("path") if model_section.name == "hf" else None
    if sharded:
        from .models.hf import has_weights

        return path if has_weights(path) else None
    return None


def plan_for_run(model_section, checkpoint_section, checkpoints_root: Path, module: nn.Module) -> InitWeights | None:
    """What model.init_from (or, for a model built on the meta device, the hf directory's weights)
    puts into the model at this launch, or None: nothing on a resume, as it takes the checkpoint's
    weights, except the frozen parameters checkpoints leave out."""
    source = init_source(model_section, sharded=has_meta_parameters(module))
    if source is None:
        return None
    frozen = any(not p.requires_grad for p in module.parameters())
    if not (frozen or fresh_start(checkpoint_section, checkpoints_root)):
        return None
    strict = model_section.init_strict if model_section.init_from is not None else True
    return InitWeights(*plan_init(module, source, strict), explicit=model_section.init_from is not None)


class InitWeights:
    """Planned initial weights: load them into the model, or hash their files."""

    def __init__(self, files: WeightFiles, plan: dict[str, str], explicit: bool = True):
        self.files, self.plan = files, plan
        self.explicit = explicit  # model.init_from, not the hf directory's own weights
        self._digest: str | None = None

    def load(self, module: nn.Module) -> None:
        load_planned(module, self.files, self.plan)

    def sources(self, module: nn.Module) -> dict[int, str]:
        """id of each planned tensor of `module` -> the name it is read by (files.read)."""
        targets = module.state_dict(keep_vars=True)
        return {id(targets[name]): file_name for file_name, name in self.plan.items()}

    def fills(self, module: nn.Module) -> bool:
        """Whether every parameter on the meta device gets its values from the files."""
        targets = module.state_dict(keep_vars=True)
        filled = {id(targets[name]) for name in self.plan.values()}
        return all(id(p) in filled for p in module.parameters() if p.is_meta)

    def digest(self) -> str:
        if self._digest is None:
            import hashlib

            total = hashlib.sha256()
            for file in sorted(self.files.files):
                with open(file, "rb") as f:
                    total.update(hashlib.file_digest(f, "sha256").digest())
            self._digest = total.hexdigest()
        return self._digest


def frozen_source(init: InitWeights | None, module: nn.Module) -> dict:
    """What checkpoints track for a model with frozen parameters (they leave those out): where
    they came from, checked on resume. Empty for a model without any. An hf directory's own
    weights count as the build's, whichever way they were read."""
    if all(p.requires_grad for p in module.parameters()):
        return {}
    return {"frozen_from": FrozenSource(init if init is not None and init.explicit else None)}


class FrozenSource:
    """The sha256 of model.init_from's files (None: the seeded build alone), kept in every
    checkpoint and compared on resume, before anything is loaded."""

    def __init__(self, init: InitWeights | None):
        self.init = init

    def state_dict(self) -> dict:
        return {"path": str(self.init.files.path) if self.init else None,
                "sha256": self.init.digest() if self.init else None}

    def load_state_dict(self, state: dict) -> None:
        pass  # checked in check_compatible

    def check_compatible(self, saved: dict | None) -> None:
        if saved is None:
            raise ConfigError(INIT_KEY, "the checkpoint records no source for the model's frozen parameters (a run "
                                        "without any wrote it); resume with the configuration that wrote it")
        mine = self.state_dict()
        if saved["sha256"] == mine["sha256"]:
            return
        if saved["sha256"] is None or mine["sha256"] is None:
            had = f"from {saved['path']}" if saved["path"] else "without model.init_from"
            raise ConfigError(INIT_KEY, f"the checkpoint's frozen weights were built {had}; set it so again")
        raise ConfigError(INIT_KEY, f"{mine['path']} is not the file the checkpoint's frozen weights came from "
                                    f"({saved['path']}, sha256 {saved['sha256'][:12]}..., now "
                                    f"{mine['sha256'][:12]}...); restore that file or start a new run")


def plan_init(module: nn.Module, path, strict: bool = True) -> tuple[WeightFiles, dict[str, str]]:
    """Open the weights and match them to the module's state: {file name: module name}. Names
    that share one tensor (tied weights) are satisfied by any of them, as save_pretrained writes
    a tied weight once. Around a peft model, the base model's own names match and the adapters
    keep their initialisation. A mismatch is a ConfigError naming the first few keys, unless
    strict is off; a shape mismatch is always one."""
    files = WeightFiles(path)
    available = set(files.names())
    groups: dict[int, list[str]] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    plan, missing, known = {}, [], set()
    for names in groups.values():
        candidates = list(dict.fromkeys([*names, *map(base_name, names)]))
        known.update(candidates)
        found = [n for n in candidates if n in available]
        if found:
            plan[found[0]] = names[0]
        elif not any(is_adapter(n) for n in names):
            missing.append(base_name(names[0]))
    unexpected = [n for n in files.names() if n not in known]
    if strict and (missing or unexpected):
        raise ConfigError(INIT_KEY, f"{path} does not match the model: {_some('missing', missing)}"
                                    f"{'; ' if missing and unexpected else ''}{_some('unexpected', unexpected)} "
                                    "(model.init_strict=false loads the matching keys only)")
    targets = module.state_dict(keep_vars=True)
    for file_name, name in plan.items():
        if files.shape(file_name) != tuple(targets[name].shape):
            raise ConfigError(INIT_KEY, f"{path}: {file_name} has shape {list(files.shape(file_name))}, the model's "
                                        f"{name} {list(targets[name].shape)}")
    return files, plan


PEFT_PREFIX = "base_model.model."


def base_name(name: str) -> str:
    """A parameter's name in the model peft wraps (what a pretrained file holds)."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def is_adapter(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def load_planned(module: nn.Module, files: WeightFiles, plan: dict[str, str]) -> None:
    """Copy the planned tensors into the module in place, cast to each parameter's dtype. A
    DTensor (FSDP2) reads only the slice its rank holds."""
    targets = module.state_dict(keep_vars=True)
    try:
        with torch.no_grad():
            for file_name, name in plan.items():
                target = targets[name]
                if hasattr(target, "device_mesh"):
                    local = target.to_local()
                    if local.numel():
                        files.read_into(local, file_name, local_index(target))
                else:
                    files.read_into(target, file_name)
    finally:
        files.close()  # not one descriptor per shard file held for the rest of the run


def local_index(dtensor) -> tuple[slice, ...]:
    """Which part of the full tensor this rank's shard of a DTensor is. Each mesh dimension that
    shards a tensor dimension splits what the dimensions before it left by torch.chunk's rule
    (pieces of ceil(n / size), the last ones shorter or empty), as FSDP2 does; the result is
    checked against the shard's own shape."""
    from torch.distributed.tensor import Replicate, Shard

    bounds = [(0, n) for n in dtensor.shape]
    coordinate = dtensor.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(dtensor.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise NotImplementedError(f"reading a slice for placement {placement}")
        start, stop = bounds[placement.dim]
        piece = -(-(stop - start) // dtensor.device_mesh.size(mesh_dim))
        first = min(start + piece * coordinate[mesh_dim], stop)
        bounds[placement.dim] = (first, min(first + piece, stop))
    index = tuple(slice(a, b) for a, b in bounds)
    if tuple(b - a for a, b in bounds) != tuple(dtensor.to_local().shape):
        raise RuntimeError(f"shard of shape {list(dtensor.to_local().shape)} is not {index} of {list(dtensor.shape)}")
    return index


def _some(what: str, names: list[str]) -> str:
    if not names:
        return ""
    more = f" (+{len(names) - SHOWN_KEYS} more)" if len(names) > SHOWN_KEYS else ""
    return f"{what} {', '.join(names[:SHOWN_KEYS])}{more}"
