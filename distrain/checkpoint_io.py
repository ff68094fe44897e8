"""Safe file reading: checkpoints hold only tensors and plain containers and primitives.

Every .pt file of a checkpoint is vetted before anything loads it, including files that
DeepSpeed later reads itself: the globals its pickle would import are listed without
unpickling, and anything outside torch's weights-only set (plus two plain DeepSpeed
value classes, in DeepSpeed's own files) is refused.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

# plain value types (an enum, dataclasses) DeepSpeed pickles into its optimizer files
DEEPSPEED_GLOBALS = {"deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address"}


class UnsafeCheckpointError(Exception):
    pass


def safe_load(path: Path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe(path, str(e).splitlines()[0]) from None


def verify_crc(directory: Path) -> str | None:
    """torch.save writes zip archives with a CRC-32 per record that torch.load never checks: a
    flipped byte in a tensor would load silently. Check them (resumes are rare, this is cheap)."""
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{path.relative_to(directory)}: {e}"
        if bad is not None:
            return f"{path.relative_to(directory)}: record {bad} fails its CRC check"
    return None


def vet_files(directory: Path) -> None:
    """Raise UnsafeCheckpointError if any .pt file under `directory` needs arbitrary unpickling."""
    for path in sorted(Path(directory).rglob("*.pt")):
        allowed = DEEPSPEED_GLOBALS if "deepspeed" in path.relative_to(directory).parts else set()
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
        except (RuntimeError, ValueError, OSError, pickle.UnpicklingError, EOFError):
            continue  # unreadable rather than unsafe: the loader reports it, and resume falls back
        if unsafe:
            raise _unsafe(path, f"it references {', '.join(sorted(unsafe))}")


def _unsafe(path, detail) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} needs arbitrary unpickling, which distrain refuses (only tensors and plain containers are "
        f"loaded; {detail}); re-save it as a plain state_dict")
