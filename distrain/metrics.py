"""What the loop measures: windows of training statistics, peak memory, model FLOPs
utilisation and stragglers. One all-reduce per log line, none per step."""
from __future__ import annotations

import math
import resource

import torch

from . import dist

# dense bf16/fp16 tensor-core peaks, FLOP/s, by device name as CUDA reports it (most specific first)
PEAK_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def flops_per_sample(module, meta: dict) -> float | None:
    """Training FLOPs per sample, for models that know theirs (the GPT: per token x tokens)."""
    if hasattr(module, "flops_per_token") and "seq_len" in meta:
        return module.flops_per_token() * meta["seq_len"]
    return None


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Window:
    """Training statistics between two log lines."""

    def __init__(self):
        self.losses, self.samples, self.steps = [], 0, 0
        self.time = self.data_wait = self.busy = 0.0

    def add(self, losses: list, samples: int, seconds: float, data_wait: float, busy: float) -> None:
        self.losses += losses  # (float or device tensor, count) pairs: no device sync per step
        self.samples += samples
        self.steps += 1
        self.time += seconds
        self.data_wait += data_wait
        self.busy += busy

    def reduce(self, comm) -> tuple[float, list[float]]:
        """(global mean loss over the counted items, per-rank busy seconds per step), in one
        all-reduce (none on one process)."""
        w, r = dist.world_size(), dist.rank()
        busy, (total, items) = self.busy / max(self.steps, 1), self.sums()
        per_rank = [busy]
        if w > 1:
            buf = torch.zeros(2 + w, dtype=torch.float64)
            buf[0], buf[1], buf[2 + r] = total, items, busy
            buf = comm.all_reduce_sum(buf.to(comm.device)).cpu()
            total, items, per_rank = buf[0].item(), buf[1].item(), buf[2:].tolist()
        loss = total / max(items, 1)
        return (loss if math.isfinite(loss) else float("nan")), per_rank

    def sums(self) -> tuple[float, float]:
        """(sum over micro-batches of mean loss x items, items). Losses are floats where the step ran
        on the CPU (reading one there costs nothing) and device tensors elsewhere (read here, once)."""
        if not self.losses:
            return 0.0, 0.0
        counts = torch.tensor([float(n) for _, n in self.losses], dtype=torch.float64)
        if isinstance(self.losses[0][0], float):
            return sum(m * n for m, n in zip((m for m, _ in self.losses), counts.tolist())), counts.sum().item()
        means = torch.stack([m.float() for m, _ in self.losses]).double().cpu()
        return (means * counts).sum().item(), counts.sum().item()


def typical(busy: list[float]) -> float:
    """The lower median: with two ranks the faster one's time (the upper median would be the
    slower rank's own, and no rank could ever exceed a multiple of it)."""
    return sorted(busy)[(len(busy) - 1) // 2]


def stragglers(busy: list[float], factor: float) -> list[int]:
    """Ranks whose own work per step (data wait + forward) exceeds `factor` x the lower median."""
    if factor <= 0 or len(busy) < 2:
        return []
    median = typical(busy)
    return [r for r, t in enumerate(busy) if median > 0 and t > factor * median]
