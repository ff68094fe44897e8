"""Safe file reading: checkpoints hold only tensors and plain containers and primitives."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch


class UnsafeCheckpointError(Exception):
    pass


def safe_load(path: Path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{path} needs arbitrary unpickling, which distrain refuses (only tensors and plain containers are "
            f"loaded); re-save it as a plain state_dict. Detail: {str(e).splitlines()[0]}") from None
