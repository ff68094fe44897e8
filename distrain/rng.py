"""Per-rank random number generator state, as tensors and plain values only."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch

from .checkpoint_io import safe_load

log = logging.getLogger("distrain")


def capture() -> dict:
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore(directory: Path, rank: int, same_world_size: bool) -> None:
    path = directory / f"rank{rank}.pt"
    if not same_world_size or not path.exists():
        # a new rank, or ranks that now see other data: keep the fresh seeding of this run
        log.info("no RNG state for rank %d in %s; keeping this run's seeding", rank, directory)
        return
    s = safe_load(path)
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss"]))
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
