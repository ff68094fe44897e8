"""Rank-aware logging and metric sinks.

Console: rank 0's lines (info to stdout, warnings and errors to stderr), plus warnings
and errors of the other ranks, prefixed with their rank. Files: every rank's full log
in logs/rank{R}.log with timestamps and rank. Python warnings raised by libraries reach
the console once, from rank 0; every rank keeps them in its own file.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

LOGGER = "distrain"
LIBRARY_LOGGERS = ("DeepSpeed", "torch.distributed")
FLUSH_EVERY_S = 1.0  # info lines and metrics reach the disk at most this late; warnings at once


class _FlushClock:
    """Says when a file written line by line is due for a flush: at most every FLUSH_EVERY_S,
    since a write system call per training log line cost more than the rest of the line."""

    def __init__(self):
        self._next = 0.0

    def due(self, urgent: bool = False) -> bool:
        now = time.monotonic()
        if urgent or now >= self._next:
            self._next = now + FLUSH_EVERY_S
            return True
        return False


def warn_unwritable(what: str, path, error: BaseException) -> None:
    """A file the run cannot write (full disk, vanished mount): one line on the console, no traceback."""
    reason = getattr(error, "strerror", None) or str(error)
    print(f"distrain: warning: cannot write {what} {path} ({reason}); continuing without it", file=sys.stderr,
          flush=True)


class _LogFile(logging.FileHandler):
    """A rank's log file: warnings and errors go through at once, other lines at most
    FLUSH_EVERY_S late. A flush from outside emit (the watchdog, close) is always real.
    A file that cannot be written (a full disk) is given up with one warning: the console goes on."""

    def __init__(self, path):
        super().__init__(path)
        self._clock, self._due, self._given_up = _FlushClock(), True, False

    def emit(self, record):
        self._due = self._clock.due(urgent=record.levelno >= logging.WARNING)
        super().emit(record)  # calls flush()
        self._due = True

    def flush(self):
        if self._due:
            try:
                super().flush()
            except OSError as e:
                self._give_up(e)

    def handleError(self, record):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self._give_up(error)
        else:  # a formatting mistake, not the file's fault
            super().handleError(record)

    def close(self):
        try:
            super().close()
        except OSError:  # what was buffered is lost with the disk; the warning was given at the failure
            pass

    def _give_up(self, error) -> None:
        for name in (LOGGER, "py.warnings", *LIBRARY_LOGGERS):
            # a new list, not removeHandler: the logger may be iterating its list right now (this emit),
            # and removing from it in place would skip the console handler after this one
            logger = logging.getLogger(name)
            logger.handlers = [h for h in logger.handlers if h is not self]
        if not self._given_up:
            self._given_up = True
            warn_unwritable("the log file", self.baseFilename, error)
            # the stream stays open for whoever holds it (the watchdog's stack dumps) but now leads to
            # /dev/null: later flushes, and the final close, no longer fail
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.stream.fileno())
                os.close(devnull)
            except (OSError, AttributeError, ValueError):
                pass


class _Below(logging.Filter):
    def __init__(self, level):
        super().__init__()
        self.level = level

    def filter(self, record):
        # file_only: a line the console shows another way (the progress bar) but the log keeps
        return record.levelno < self.level and not getattr(record, "file_only", False)


def setup_logging(run_dir: Path, rank: int, world_size: int, level: str = "info") -> logging.Logger:
    close_logging()
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    path = run_dir / "logs" / f"rank{rank}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = _LogFile(path)
    except OSError as e:
        warn_unwritable("the log file", path, e)
        file_handler = None
    handlers = []
    if file_handler is not None:
        file_handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"))
        file_handler.setLevel(logging.DEBUG)
        handlers.append(file_handler)
    prefix = f"[rank{rank}] " if world_size > 1 and rank else ""
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter(f"{prefix}%(levelname)s %(message)s" if rank else "%(message)s"))
    handlers.append(err)
    if rank == 0:
        out = logging.StreamHandler(sys.stdout)
        out.setLevel(getattr(logging, level.upper()))
        out.addFilter(_Below(logging.WARNING))
        out.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(out)
    for h in handlers:
        log.addHandler(h)
    # library loggers and Python warnings: all into this rank's file, the console from rank 0 only
    logging.captureWarnings(True)
    for name in ("py.warnings", *LIBRARY_LOGGERS):
        lib = logging.getLogger(name)
        lib.handlers = ([file_handler] if file_handler else []) + ([err] if rank == 0 else [])
        lib.propagate = False
    return log



def log_file_stream():
    """The open stream of this rank's log file (for faulthandler), or None."""
    for h in logging.getLogger(LOGGER).handlers:
        if isinstance(h, logging.FileHandler):
            return h.stream
    return None


def close_logging() -> None:
    for name in (LOGGER, "py.warnings", *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            logger.removeHandler(h)
            if isinstance(h, logging.FileHandler):
                h.close()
    logging.captureWarnings(False)


class MetricsWriter:
    """Rank 0 only: metrics.jsonl, optionally TensorBoard. Other ranks get a writer that drops everything."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.enabled = enabled
        self._file = None
        if enabled:
            try:
                self._file = open(run_dir / "metrics.jsonl", "a")
            except OSError as e:
                warn_unwritable("metrics", run_dir / "metrics.jsonl", e)
        self._clock = _FlushClock()
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("log.tensorboard=true needs the tensorboard package "
                                   "(pip install 'distrain[tensorboard]')") from e
            self._tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                if self._clock.due(urgent=record.get("split") != "train"):  # eval lines at once
                    self._file.flush()
            except OSError as e:
                self._give_up_file(e)
        if self._tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{split}/{key}", value, record["step"])

    def _give_up_file(self, error) -> None:
        warn_unwritable("metrics", self._file.name, error)
        file, self._file = self._file, None
        try:
            file.close()
        except OSError:
            pass

    def close(self) -> None:
        if self._file:
            try:
                self._file.close()
            except OSError as e:
                warn_unwritable("metrics", self._file.name, e)
        if self._tb:
            self._tb.close()


def adopt_library_logger(name: str) -> None:
    """Route a library logger created after setup_logging (DeepSpeed's, at import) like the others."""
    lib = logging.getLogger(name)
    lib.handlers = list(logging.getLogger("py.warnings").handlers)
    lib.propagate = False
