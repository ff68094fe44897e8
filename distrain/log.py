"""Rank-aware logging and metric sinks.

Console: rank 0's lines, plus warnings and errors of any rank prefixed with the rank.
Files: every rank's full log in logs/rank{R}.log. Metrics: rank 0 appends JSON lines
to metrics.jsonl (and TensorBoard scalars when enabled).
"""
from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

LOGGER = "distrain"


def setup_logging(run_dir: Path, rank: int, world_size: int, level: str = "info") -> logging.Logger:
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
    file_handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s"))
    file_handler.setLevel(logging.DEBUG)
    log.addHandler(file_handler)
    console = logging.StreamHandler(sys.stderr if rank else sys.stdout)
    prefix = f"[rank{rank}] " if world_size > 1 else ""
    console.setFormatter(logging.Formatter(f"{prefix}%(message)s" if rank == 0 else f"[rank{rank}] %(levelname)s %(message)s"))
    console.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
    log.addHandler(console)
    # library warnings go to this rank's file; the console sees them once, from rank 0
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.handlers = [file_handler] + ([console] if rank == 0 else [])
    py_warnings.propagate = False
    if rank:
        warnings.filterwarnings("default")
    return log


def close_logging() -> None:
    for name in (LOGGER, "py.warnings"):
        for h in list(logging.getLogger(name).handlers):
            logging.getLogger(name).removeHandler(h)
            h.close()
    logging.captureWarnings(False)


class MetricsWriter:
    """Rank 0 only: metrics.jsonl, optionally TensorBoard. Other ranks get a writer that drops everything."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1) if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{split}/{key}", value, record["step"])

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb:
            self._tb.close()
