"""`distrain export CHECKPOINT OUT [--format pt|safetensors|hf]`: any checkpoint's model (full,
DCP-sharded or DeepSpeed's, read in one process whatever the world size that wrote it) as a
plain state_dict (torch.load(..., weights_only=True)), a safetensors file, or, for Hugging
Face models, the save_pretrained directory that `AutoModel*.from_pretrained` reads. Also what
a finished run writes to final/ beside model.pt (write_final)."""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoint_io import UnsafeCheckpointError, safe_load, vet_files


def model_state(checkpoint: Path) -> dict:
    checkpoint = resolve(checkpoint)
    vet_files(checkpoint)
    if (checkpoint / "model.pt").exists():
        return safe_load(checkpoint / "model.pt")["model"]
    if (checkpoint / "dcp").is_dir():
        return _from_dcp(checkpoint / "dcp")
    if (checkpoint / "deepspeed").is_dir():
        return _from_deepspeed(checkpoint / "deepspeed")
    raise FileNotFoundError(f"{checkpoint} holds no model.pt, dcp/ or deepspeed/ checkpoint")


def resolve(path: Path) -> Path:
    """A run dir, its checkpoints/ dir, or a step dir -> the step dir."""
    path = Path(path)
    for candidate in (path / "checkpoints" / "latest", path / "latest"):
        if candidate.is_file():
            return candidate.parent / candidate.read_text().strip()
    return path


def _from_dcp(path: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    template = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
                for key, meta in metadata.state_dict_metadata.items()
                if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    state = {"model": template}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state["model"]


def _from_deepspeed(path: Path) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (path / "state").is_dir():  # a model with frozen parameters: its trained part, whole
        universal = safe_load(path / "universal.pt")
        return {**universal["params"], **universal.get("buffers", {})}
    model_files = sorted((path / "state").glob("*model_states.pt"))
    first = safe_load(model_files[0], map_location="cpu") if model_files else {}
    if model_files and not list((path / "state").glob("*optim_states.pt")):  # stage 0: a plain module state
        return {k: v.float() if v.is_floating_point() else v for k, v in first["module"].items()}
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="state")
    return {k: v.contiguous() for k, v in state.items()}


def rebuilt_model(checkpoint: Path):
    """The checkpoint's model rebuilt as its run built it (resolved config from trainer.pt, the
    same seed, model.init_from), on the CPU: what restores the frozen weights checkpoints leave out."""
    from .config import from_dict
    from .data import build_datasets
    from .models import build_model
    from .weights import plan_init, load_planned

    cfg = from_dict(safe_load(resolve(checkpoint) / "trainer.pt")["config"])
    torch.manual_seed(cfg.run.seed)
    _, _, data_meta = build_datasets(cfg.data)
    module = build_model(cfg.model, data_meta)
    if cfg.model.init_from is not None and any(not p.requires_grad for p in module.parameters()):
        load_planned(module, *plan_init(module, cfg.model.init_from, cfg.model.init_strict))
    return module


def exported(checkpoint: Path, fmt: str) -> tuple[dict, object]:
    """(the state to write, the model it belongs to or None). A LoRA model's checkpoint holds its
    adapters only: it is completed from the rebuilt base and merged, as final/ holds it."""
    from .lora import is_peft_model
    from .strategies.common import load_model_state

    state = model_state(checkpoint)
    if fmt != "hf" and not _lora_config(checkpoint):
        return state, None
    module = rebuilt_model(checkpoint)
    load_model_state(module, state)
    if is_peft_model(module):
        module = module.merge_and_unload()
    return module.state_dict(), module


def _lora_config(checkpoint: Path):
    return safe_load(resolve(checkpoint) / "trainer.pt")["config"].get("model", {}).get("lora")


def write(state: dict, module, out: Path, fmt: str) -> None:
    from .config import ConfigError

    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_safetensors(state, out)
    elif fmt == "hf":
        if not is_hf_model(module):
            raise ConfigError("--format", f"hf needs a Hugging Face model; this checkpoint's is "
                                          f"{type(module).__name__} (use pt or safetensors)")
        save_hf(state, module, out)
    else:
        tmp = out.with_name(out.name + ".tmp")
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
        os.replace(tmp, out)


def save_safetensors(state: dict, path) -> Path:
    """A state dict as one safetensors file. Tensors sharing storage (tied weights) are written
    once under their first name, as safetensors refuses shared storage and as save_pretrained
    does; the loader ties them back. Written to a temporary name, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    seen: dict[tuple, str] = {}
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
               tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = tensor.cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})  # "format": what transformers checks before loading
    os.replace(tmp, path)
    return path


def is_hf_model(module: nn.Module) -> bool:
    return hasattr(module, "save_pretrained") and hasattr(module, "config") and hasattr(module.config, "to_dict")


def save_hf(state: dict, module: nn.Module, directory) -> Path:
    """The save_pretrained layout (config, weights, generation config where the model has one)
    of `state`, through a fresh model of the module's own class built from its config: the
    module itself may be sharded or wrapped. Written to a temporary directory, then renamed."""
    directory = Path(directory)
    model = fresh_hf_model(module)
    model.load_state_dict(state, strict=False)  # tied duplicates and non-persistent buffers may be absent
    model.tie_weights()
    if getattr(module, "generation_config", None) is not None and model.can_generate():
        model.generation_config = copy.deepcopy(module.generation_config)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_progress():  # a progress bar per file on stderr, after the run's summary
        model.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def fresh_hf_model(module: nn.Module) -> nn.Module:
    """An unwrapped model of the module's class (FSDP2 subclasses the class it shards)."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import PreTrainedModel

    cls = next(c for c in type(module).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule))
    config = copy.deepcopy(module.config)
    return cls(config).float()


def write_final(state: dict, module: nn.Module, final_dir, is_main: bool) -> dict:
    """final/model.safetensors and, for Hugging Face models, final/hf/, on rank 0 (the state is
    complete there). Around a peft model also final/adapter/ in peft's format, and the other
    files hold the merged model. Returns the state final/model.pt is to hold."""
    if not is_main:
        return state
    from .lora import is_peft_model

    final_dir = Path(final_dir)
    if is_peft_model(module):
        state, module = export_adapter(state, module, final_dir)
    save_safetensors(state, final_dir / "model.safetensors")
    if is_hf_model(module):
        save_hf(state, module, final_dir / "hf")
    return state


def export_adapter(state: dict, module: nn.Module, final_dir: Path) -> tuple[dict, nn.Module]:
    """Writes final/adapter/ (what PeftModel.from_pretrained(base, final/adapter) loads). Returns
    the merged model's state and its base model where the base can be rebuilt (a Hugging Face
    model), else the state and module as they are."""
    from peft import get_peft_model_state_dict

    from .lora import wrap

    config = copy.deepcopy(module.peft_config["default"])
    adapter = final_dir / "adapter"
    tmp = adapter.with_name(adapter.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_safetensors(get_peft_model_state_dict(module, state_dict=state), tmp / "adapter_model.safetensors")
    config.save_pretrained(str(tmp))
    shutil.rmtree(adapter, ignore_errors=True)
    os.replace(tmp, adapter)
    base = module.get_base_model()
    if not is_hf_model(base):
        return state, module
    rebuilt = wrap(fresh_hf_model(base), config)
    rebuilt.load_state_dict(state, strict=False)  # tied duplicates and non-persistent buffers may be absent
    merged = rebuilt.merge_and_unload()
    return merged.state_dict(), base


def main(argv=None) -> int:
    from .config import ConfigError

    p = argparse.ArgumentParser(prog="distrain export", description=__doc__)
    p.add_argument("checkpoint", type=Path, help="a checkpoint dir (or a run dir: its latest checkpoint)")
    p.add_argument("out", type=Path, help="output file (pt, safetensors) or directory (hf)")
    p.add_argument("--format", choices=("pt", "safetensors", "hf"), default="pt", help="output format (default pt)")
    args = p.parse_args(argv)
    try:
        state, module = exported(args.checkpoint, args.format)
        write(state, module, args.out, args.format)
    except (FileNotFoundError, UnsafeCheckpointError, ConfigError) as e:
        print(f"distrain export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(state)} tensors to {args.out} ({args.format})")
    return 0
