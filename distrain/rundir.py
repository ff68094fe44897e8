"""One launch per run directory: a lock held by global rank 0 for the whole run, and what the
holder clears and checks at start.

The lock is `fcntl.flock` on `<run.dir>/.lock`, so a holder that dies for any reason
(SIGKILL, a lost node) releases it with its last file descriptor, and nothing stale is
ever left. The holder writes its host, process id and start time into the file, so a
refused launch can name it. On a filesystem whose locks do not work, the file itself is
the lock: created exclusively, and taken over only when its owner on this host is gone.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from .checkpoint import committed_steps
from .checkpoint_io import free_bytes, manifest_bytes
from .config import ConfigError

LOCK_NAME = ".lock"
POLL_S = 0.25  # how often a waiting launch looks again
# what flock answers on filesystems that do not implement it (some NFS and FUSE mounts)
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirInUse(ConfigError):
    def __init__(self, run_dir: Path, holder: str, waited_s: float):
        waited = f" (waited {waited_s:g} s, run.lock_wait_s)" if waited_s else ""
        super().__init__("run.dir", f"{run_dir} is in use by {holder}{waited}; wait for that run to end, stop it, "
                                    "or choose another run.dir")


class RunDirLock:
    """Take with `RunDirLock.acquire(run_dir, wait_s)`; `release()` (or process exit) gives it back.
    `notes` holds what a log line should say once logging exists (the lock-file fallback)."""

    def __init__(self, path: Path, fd: int | None, notes: list[str]):
        self.path, self._fd, self.notes = path, fd, notes
        self._held = True

    @classmethod
    def acquire(cls, run_dir: Path, wait_s: float, on_wait=None) -> RunDirLock:
        """Wait up to wait_s for a holder that is shutting down; RunDirInUse if it is still there.
        on_wait(holder) is called once when the lock is busy and waiting begins."""
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / LOCK_NAME
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError("run.dir", f"cannot use {run_dir}: {e.strerror}") from None
        deadline, waiting = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno not in NO_LOCKS:
                    raise
                os.close(fd)
                return _acquire_lock_file(run_dir, wait_s, e.strerror)
            else:
                _write_holder(fd)
                return cls(path, fd, [])
            if time.monotonic() >= deadline:
                holder = _describe(_read_holder(path))
                os.close(fd)
                raise RunDirInUse(run_dir, holder, wait_s)
            if not waiting and on_wait is not None:
                on_wait(_describe(_read_holder(path)))
            waiting = True
            time.sleep(POLL_S)

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fd is None:  # the lock-file fallback: the file is the lock
            self.path.unlink(missing_ok=True)
        else:
            os.close(self._fd)  # the kernel drops the flock with it; the file stays for the next holder


def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}


def _write_holder(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode(), 0)
    except OSError:  # a full disk: the lock holds all the same, only unnamed
        pass


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a holder between taking the lock and writing its name
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another launch"
    return f"process {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"


def _acquire_lock_file(run_dir: Path, wait_s: float, why: str) -> RunDirLock:
    """The fallback where flock does not work: an exclusively created file naming its owner. A file
    whose owner ran on this host and is gone is taken over; one from another host cannot be checked."""
    path = run_dir / (LOCK_NAME + "-file")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if _owner_gone(holder):
                path.unlink(missing_ok=True)
                continue
            if time.monotonic() >= deadline:
                raise RunDirInUse(run_dir, _describe(holder) + f" (lock file {path}: remove it if that process "
                                                              "is gone)", wait_s) from None
            time.sleep(POLL_S)
            continue
        _write_holder(fd)
        os.close(fd)
        note = f"file locks do not work in {run_dir} ({why}); using the lock file {path}, whose owner is checked " \
               "on this host only"
        return RunDirLock(path, None, [note])


def _owner_gone(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def clear_for_start(checkpoints: Path, start_over: bool) -> list[str]:
    """Under the lock, before anything is written: remove every checkpoint if starting over
    (resume=never with run.overwrite), and what saves that never committed left behind (a kill
    during a save or a retention, a full disk). The names of what was removed."""
    if start_over and checkpoints.exists():
        shutil.rmtree(checkpoints)
    if not checkpoints.is_dir():
        return []
    leftovers = sorted(p for pattern in (".tmp-step_*", ".retired-*", "latest.tmp") for p in checkpoints.glob(pattern))
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return [p.name for p in leftovers]


def space_warning(checkpoints: Path) -> str | None:
    """A line to warn with at start if the next checkpoint (as big as the newest) will not fit."""
    steps = committed_steps(checkpoints)
    needed = manifest_bytes(checkpoints / f"step_{steps[-1]:08d}") if steps else None
    free = free_bytes(checkpoints)
    if needed is None or free is None or free >= needed:
        return None
    return (f"only {free} bytes are free under {checkpoints} and a checkpoint takes about {needed}: the next "
            "checkpoint will stop the run unless space is freed")
