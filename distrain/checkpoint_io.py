"""Checkpoint files on disk: safe reading, integrity checks (manifest, CRC) and durable writes.

Checkpoints hold only tensors and plain containers and primitives.

distrain loads its own files with torch's weights-only unpickler. The files DeepSpeed reads
itself are vetted before it loads them: the globals their pickles would import are listed
without unpickling, and anything outside torch's weights-only set (plus a few plain
DeepSpeed value classes) is refused.
"""
from __future__ import annotations

import json
import mmap
import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch

try:  # SIMD CRC-32 that releases the GIL; zlib's is the fallback
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - platforms without ISA-L wheels
    from zlib import crc32

# plain value types (an enum, dataclasses) DeepSpeed pickles into its optimizer files
DEEPSPEED_GLOBALS = {"deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address"}

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature ... name and extra lengths


class UnsafeCheckpointError(Exception):
    pass


def safe_load(path: Path, map_location="cpu", mmap: bool = False):
    """torch.load restricted to tensors and plain containers. With mmap, tensors are views of the
    file's pages: what the caller keeps past the load it must copy out (see strategies.common)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        unsafe = _unsafe_globals(path, allowed=set())
        if unsafe:  # torch's message is a page of advice; name what the file would import
            raise _unsafe(path, f"it references {', '.join(sorted(unsafe))}") from None
        raise


def verify_crc(directory: Path) -> str | None:
    """torch.save writes zip archives with a CRC-32 per record that torch.load never checks: a
    flipped byte in a tensor would load silently. Check them, beside the load that reads the same
    bytes (ISA-L's CRC when installed: several times zlib's speed, so the check is not the slower)."""
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            bad = _failing_record(path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as e:
            return f"{path.relative_to(directory)}: {e}"
        if bad is not None:
            return f"{path.relative_to(directory)}: record {bad} fails its CRC check"
    return None


def _failing_record(path: Path) -> str | None:
    with zipfile.ZipFile(path) as z, open(path, "rb") as f, \
            mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data, memoryview(data) as view:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED:  # not torch's layout: zipfile checks as it reads
                with z.open(info) as record:
                    while record.read(1 << 22):
                        pass
                continue
            signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(data, info.header_offset)
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            if signature != b"PK\x03\x04" or start + info.compress_size > len(data):
                raise zipfile.BadZipFile(f"record {info.filename} lies outside the file (truncated?)")
            if crc32(view[start : start + info.compress_size]) != info.CRC:
                return info.filename
    return None


def vet_files(directory: Path) -> None:
    """Raise UnsafeCheckpointError if a .pt file that DeepSpeed unpickles itself needs arbitrary
    unpickling. The files distrain reads go through safe_load, which refuses the same globals
    while it loads: vetting them too would parse each of them twice."""
    for path in sorted(Path(directory).rglob("*.pt")):
        if "deepspeed" not in path.relative_to(directory).parts:
            continue
        unsafe = _unsafe_globals(path, allowed=DEEPSPEED_GLOBALS)
        if unsafe:
            raise _unsafe(path, f"it references {', '.join(sorted(unsafe))}")


def _unsafe_globals(path: Path, allowed: set) -> set:
    """The globals outside torch's weights-only set that the file's pickle would import (listed
    without unpickling). An unreadable file has none: its loader reports it, and resume falls back."""
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
    except (RuntimeError, ValueError, OSError, pickle.UnpicklingError, EOFError):
        return set()


def _unsafe(path, detail) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} needs arbitrary unpickling, which distrain refuses (only tensors and plain containers are "
        f"loaded; {detail}); re-save it as a plain state_dict")


def write_manifest(path: Path) -> None:
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    (path / "manifest.json").write_text(json.dumps(files, indent=0))


def check_manifest(path: Path) -> str | None:
    """A cheap integrity check: every file written at commit time is there with its size."""
    try:
        files = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"no readable manifest ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
    return None


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
