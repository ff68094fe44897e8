"""Checkpoint files on disk: safe reading, integrity checks (manifest, CRC) and durable writes.

Checkpoints hold only tensors and plain containers and primitives.

distrain loads its own files with torch's weights-only unpickler. The files DeepSpeed reads
itself are vetted before it loads them: the globals their pickles would import are listed
without unpickling, and anything outside torch's weights-only set (plus a few plain
DeepSpeed value classes) is refused.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import pickle
import shutil
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


# what a full, over-quota, failing or vanished filesystem answers a write with
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ENODEV, errno.ESTALE, errno.EROFS, errno.ENXIO}
# torch's zip writer reports a short write as a RuntimeError that has lost the errno
TORCH_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


class UnsafeCheckpointError(Exception):
    pass


class CheckpointWriteError(Exception):
    """A checkpoint could not be written because of its storage. The message is the whole story
    (path, cause, bytes needed and free): it is shown as it is, on one line."""


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
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        tmp.unlink(missing_ok=True)  # path keeps its old content
        raise
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


def storage_failure(exc: BaseException, where: Path, needed: int) -> CheckpointWriteError | None:
    """A CheckpointWriteError describing `exc` if the storage under `where` caused it, else None.
    A short write reported by torch without an errno counts as a full disk when too little is free."""
    code = _storage_errno(exc)
    free = free_bytes(where)
    if code is None:
        if not any(marker in str(e) for e in _chain(exc) for marker in TORCH_SHORT_WRITE):
            return None
        if free is not None and free >= needed:
            return CheckpointWriteError(f"cannot write checkpoint {where}: {_first_line(exc)} "
                                        f"({_space(needed, free)})")
        code = errno.ENOSPC
    return CheckpointWriteError(f"cannot write checkpoint {where}: {os.strerror(code)} ({_space(needed, free)})")


def not_enough_space(where: Path, needed: int) -> CheckpointWriteError | None:
    """Checked before writing: a CheckpointWriteError if `needed` bytes do not fit under `where`."""
    free = free_bytes(where)
    if free is None or free >= needed:
        return None
    return CheckpointWriteError(f"cannot write checkpoint {where}: not enough space, nothing written "
                                f"({_space(needed, free)})")


def _space(needed: int, free: int | None) -> str:
    has = "unknown" if free is None else f"{free} bytes ({_human(free)})"
    return f"needs about {needed} bytes ({_human(needed)}), free: {has}"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _chain(exc: BaseException):
    """exc, its causes and contexts, and the per-rank failures DCP's CheckpointException gathers."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # DCP: {rank: (exception, stack summary)}
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) and f else f for f in failures.values()]


def _storage_errno(exc: BaseException) -> int | None:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
    return None


def free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on path's filesystem (None if it cannot be asked)."""
    for p in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(p).free
        except FileNotFoundError:
            continue
        except OSError:
            return None
    return None


def manifest_bytes(path: Path) -> int | None:
    """The bytes a committed checkpoint's files hold, from its manifest (no walk over its files)."""
    try:
        return sum(json.loads((Path(path) / "manifest.json").read_text()).values())
    except (OSError, ValueError, TypeError):
        return None


def state_bytes(module, optimizer) -> int:
    """A lower bound of a checkpoint's size before any exists: the weights and optimizer tensors.
    Sharded tensors (DTensor) count their global size."""
    tensors = list(module.parameters()) if module is not None else []
    if optimizer is not None:
        tensors += [v for state in getattr(optimizer, "state", {}).values() if isinstance(state, dict)
                    for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)
