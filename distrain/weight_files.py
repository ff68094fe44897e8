"""Named tensors in weight files (safetensors, sharded or not, and torch state_dicts), read
tensor by tensor or slice by slice."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import ConfigError

INIT_KEY = "model.init_from"
# safetensors' dtype names (its header's) of the dtypes read straight into a tensor's memory
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class WeightFiles:
    """Named tensors in one or more files, read lazily: `read(name, index)` returns the whole
    tensor or, with index (a tuple of slices), only that part of it."""

    def __init__(self, path):
        self.path = Path(path)
        self.where: dict[str, object] = {}  # tensor name -> the open safetensors file, or a loaded state dict
        self.files: list[Path] = []
        self.layout: dict[str, tuple] = {}  # safetensors tensor name -> (file, dtype, shape, byte offset)
        self.fds: dict[Path, int] = {}
        if not self.path.exists():
            raise ConfigError(INIT_KEY, f"no weights at {self.path}")
        file = _weights_file(self.path) if self.path.is_dir() else self.path
        if file.suffix == ".safetensors":
            self._open_safetensors(file)
        elif file.suffix == ".json":
            self._open_index(file)
        else:
            self._open_torch(file)

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        source = self.where[name]
        if isinstance(source, dict):
            return tuple(source[name].shape)
        return tuple(source.get_slice(name).get_shape())

    def read_into(self, out: torch.Tensor, name: str, index: tuple | None = None) -> None:
        """out.copy_(read(name, index)), where possible without the intermediate tensor: a whole
        tensor, or rows of it (a slice of its first dimension), whose bytes out holds as they are
        in the file (same dtype, out contiguous in CPU memory) is read from the file into out."""
        span = self._span(out, name, index)
        if span is None:
            out.copy_(self.read(name, index))
            return
        fd, offset = span
        buffer, done = memoryview(out.detach().view(-1).view(torch.uint8).numpy()), 0
        while done < len(buffer):
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n <= 0:
                raise ConfigError(INIT_KEY, f"{name}: its file ends before the tensor does")
            done += n

    def _span(self, out: torch.Tensor, name: str, index: tuple | None) -> tuple[int, int] | None:
        """(file descriptor, byte offset) of what read_into reads straight into out, or None."""
        entry = self.layout.get(name)
        if entry is None or out.device.type != "cpu" or not out.is_contiguous() or not out.numel():
            return None
        file, dtype, shape, start = entry
        index = index or ()
        rows = index[0] if index else slice(0, shape[0] if shape else 1)
        if dtype != out.dtype or any(s != slice(0, n) for s, n in zip(index[1:], shape[1:])):
            return None
        if tuple(out.shape) != ((rows.stop - rows.start, *shape[1:]) if shape else ()):
            return None  # copy_ says what does not match
        row_bytes = out.numel() * out.element_size() // max(rows.stop - rows.start, 1)
        if file not in self.fds:
            self.fds[file] = os.open(file, os.O_RDONLY)
        return self.fds[file], start + rows.start * row_bytes

    def close(self) -> None:
        """Close the descriptors read_into opened (a later read_into opens them again)."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def read(self, name: str, index: tuple | None = None) -> torch.Tensor:
        source = self.where[name]
        if isinstance(source, dict):
            tensor = source[name]
            return tensor if index is None else tensor[index]
        if index is None or not index:
            return source.get_tensor(name)
        return source.get_slice(name)[index]

    def _open_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(INIT_KEY, f"{index} is not a safetensors index (no readable weight_map: {e})")
        for shard in sorted(set(weight_map.values())):
            if not (index.parent / shard).is_file():
                raise ConfigError(INIT_KEY, f"{index} lists {shard}, which is not in {index.parent}")
            self._open_safetensors(index.parent / shard)

    def _open_safetensors(self, file: Path) -> None:
        from safetensors import safe_open

        try:
            handle = _open_for_reads(safe_open, file)
            names = list(handle.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise ConfigError(INIT_KEY, f"{file} is not a readable safetensors file: {str(e).splitlines()[0]}")
        self.where.update(dict.fromkeys(names, handle))
        self.files.append(file)
        self.layout.update(_layout(file))

    def _open_torch(self, file: Path) -> None:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input at fault
            raise ConfigError(INIT_KEY, f"{file} is not a readable state_dict: {str(e).splitlines()[0]}")
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ConfigError(INIT_KEY, f"{file} does not hold a state_dict (a mapping of names to tensors)")
        self.where.update(dict.fromkeys(state, state))
        self.files.append(file)


def _open_for_reads(safe_open, file: Path):
    """Reads with pread(2) where safetensors offers it: the bytes go straight into the tensor read,
    and the file's pages do not count in the process's memory as mapped pages do (each rank's
    peak then rises by the slice it reads, not also by the file pages it touched)."""
    try:
        return safe_open(str(file), framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors before 0.8: memory-mapped only
        return safe_open(str(file), framework="pt", device="cpu")


def _weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise ConfigError(INIT_KEY, f"{directory} holds no model.safetensors, model.safetensors.index.json "
                                "or pytorch_model.bin")


def _layout(file: Path) -> dict[str, tuple]:
    """Where each tensor's bytes are in a safetensors file, from its header (8 bytes of length,
    then JSON: dtype, shape and data_offsets counted from the end of the header)."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {name: (file, DTYPES[e["dtype"]], tuple(e["shape"]), 8 + length + e["data_offsets"][0])
            for name, e in header.items() if name != "__metadata__" and e["dtype"] in DTYPES}
