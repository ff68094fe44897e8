"""`distrain export CHECKPOINT_DIR OUT.pt`: any checkpoint's model as a plain state_dict,
loadable with torch.load(..., weights_only=True) into the bare model."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

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

    model_files = sorted((path / "state").glob("*model_states.pt"))
    first = safe_load(model_files[0], map_location="cpu") if model_files else {}
    if model_files and not list((path / "state").glob("*optim_states.pt")):  # stage 0: a plain module state
        return {k: v.float() if v.is_floating_point() else v for k, v in first["module"].items()}
    state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag="state")
    return {k: v.contiguous() for k, v in state.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="distrain export", description=__doc__)
    p.add_argument("checkpoint", type=Path, help="a checkpoint dir (or a run dir: its latest checkpoint)")
    p.add_argument("out", type=Path, help="output .pt file")
    args = p.parse_args(argv)
    try:
        state = model_state(args.checkpoint)
    except (FileNotFoundError, UnsafeCheckpointError) as e:
        print(f"distrain export: error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {len(state)} tensors to {args.out}")
    return 0
