"""Checkpoints: what is saved, the commit protocol, retention and resume.

A checkpoint directory holds the strategy's own files (model.pt, dcp/ or deepspeed/),
`trainer.pt` (step, data position, resolved config) and `rng/rank{R}.pt`. It is written
under checkpoints/.tmp-step_N, and only after every rank is done does rank 0 rename it
to checkpoints/step_N and then atomically rewrite checkpoints/latest. A directory that
was never renamed is never loaded, so a kill at any moment leaves the last good one.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import torch

from . import dist, rng
from .checkpoint_io import (CheckpointWriteError, UnsafeCheckpointError, atomic_write_text, check_manifest, fsync_dir,
                            fsync_tree, manifest_bytes, not_enough_space, safe_load, state_bytes, storage_failure,
                            verify_crc, vet_files, write_manifest)
from .config import ConfigError, config_changes

log = logging.getLogger("distrain")

STEP_DIR = re.compile(r"^step_(\d{8})$")
class Checkpointer:
    """Saves and restores what it is given to track: `files`, an object that writes and reads its own
    files in a checkpoint directory (the strategy: save(path, blocking) / load(path), collective), and
    named Stateful objects (state_dict / load_state_dict) kept together in trainer.pt by rank 0.
    `config` (the resolved config as a dict) is recorded with every checkpoint and compared on resume."""

    def __init__(self, section, run_dir: Path, env, fmt: str, config: dict):
        self.section, self.run_dir, self.env, self.format, self.config = section, run_dir, env, fmt, config
        self.root = run_dir / "checkpoints"
        self.files, self.states, self.comm = None, {}, None
        self._pending = None  # a background save waiting to be committed
        self._deleting: threading.Thread | None = None  # checkpoints past keep_last, removed in the background

    def track(self, comm, files, **states) -> None:
        self.comm, self.files, self.states = comm, files, states

    # -- before the process group exists
    def check_run_dir(self) -> None:
        resume, overwrite = self.section.resume, self.config["run"]["overwrite"]
        if resume == "never" and committed_steps(self.root) and not overwrite:
            raise ConfigError("checkpoint.resume", f"{self.run_dir} already holds checkpoints; use resume=auto to "
                                                   "continue it, run.overwrite=true to start over, or another run.name")
        if resume not in ("auto", "never") and not Path(resume).exists():
            raise ConfigError("checkpoint.resume", f"no checkpoint at {resume}")

    def due(self, step: int) -> bool:
        every = self.section.every_steps
        return bool(every) and step % every == 0

    # -- saving
    def save(self, step: int, blocking: bool = False) -> Path:
        """Collective. blocking=False lets a strategy that can write in the background do so (with
        checkpoint.async_save); the checkpoint is then committed at the next save or commit_pending.
        When the storage cannot take it (checked before writing, or a write fails), every rank stops
        with CheckpointWriteError, the partial copy is removed and `latest` is left as it was."""
        self.commit_pending()
        name = f"step_{step:08d}"
        if (self.root / name).exists():  # already committed (e.g. resumed from the final checkpoint)
            return self.root / name
        tmp = self.root / f".tmp-{name}"
        needed, failure = self._expected_bytes(), None
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = not_enough_space(tmp, needed)
            if failure is None:
                failure = self._storage_guard(lambda: (tmp / "rng").mkdir(parents=True), tmp, needed)
        self._stop_if_any_failed(failure, tmp)  # also: the directory exists for every rank
        future = None

        def write():
            nonlocal future
            torch.save(rng.capture(), tmp / "rng" / f"rank{self.env.rank}.pt")
            if self.env.is_main:
                torch.save({**{key: obj.state_dict() for key, obj in self.states.items()}, "config": self.config,
                            "format": self.format, "world_size": self.env.world_size}, tmp / "trainer.pt")
            future = self.files.save(tmp, blocking=blocking or not self.section.async_save)

        failure = self._storage_guard(write, tmp, needed)
        self._stop_if_any_failed(failure, tmp, future)
        if future is not None:
            self._pending = (tmp, name, future, needed)
            return self.root / name
        return self._commit(tmp, name, needed)

    def commit_pending(self) -> None:
        if self._pending is not None:
            tmp, name, future, needed = self._pending
            self._pending = None
            self._stop_if_any_failed(self._storage_guard(future.result, tmp, needed), tmp)
            self._commit(tmp, name, needed)

    def _commit(self, tmp: Path, name: str, needed: int) -> Path:
        """Every rank's files are on disk (the ranks agreed so): rank 0 seals and publishes them."""
        final, failure = self.root / name, None
        if self.env.is_main:
            def seal():
                write_manifest(tmp)
                fsync_tree(tmp)
                os.replace(tmp, final)
                try:
                    fsync_dir(self.root)
                    atomic_write_text(self.root / "latest", name + "\n")
                except OSError:
                    os.replace(final, tmp)  # not published: `latest` keeps naming the previous checkpoint
                    raise
            failure = self._storage_guard(seal, tmp, needed)
            if failure is None:
                self._retain(name)
                log.info("checkpoint %s committed", final)
        self._stop_if_any_failed(failure, tmp)
        return final

    def _storage_guard(self, write, tmp: Path, needed: int) -> CheckpointWriteError | None:
        """Run write(); a failure the storage caused is returned (for every rank to learn of it),
        anything else is raised."""
        try:
            write()
        except BaseException as e:  # DCP's CheckpointException is a BaseException; the rest is raised as it was
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            failure = storage_failure(e, tmp, needed)
            if failure is None:
                raise
            log.debug("checkpoint write failed", exc_info=True)
            return failure
        return None

    def _stop_if_any_failed(self, failure: CheckpointWriteError | None, tmp: Path, future=None) -> None:
        """Collective: if any rank's write failed, every rank stops here, after rank 0 removed the
        partial copy (once no rank writes into it any more)."""
        if self.comm.agree(failure is None):
            return
        if future is not None:  # a background write of this rank must end before its directory goes
            try:
                future.result()
            except BaseException as e:
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
        dist.barrier()
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise failure or CheckpointWriteError(f"stopped because another rank could not write {tmp} "
                                              "(its error line says why)")

    def _expected_bytes(self) -> int:
        """The size of the checkpoint about to be written: the previous one's, else the state's."""
        steps = committed_steps(self.root)
        size = manifest_bytes(self.root / f"step_{steps[-1]:08d}") if steps else None
        if size is None:
            size = state_bytes(getattr(self.files, "module", None), getattr(self.files, "optimizer", None))
        return size

    def _retain(self, newest: str) -> None:
        """Retire checkpoints past keep_last: a rename now (they are gone from the candidates at
        once), the deletion in the background (unlinking gigabytes is slow on many filesystems)."""
        self.wait_for_deletions()
        keep = self.section.keep_last
        for step in committed_steps(self.root)[:-keep]:
            if f"step_{step:08d}" != newest:
                os.replace(self.root / f"step_{step:08d}", self.root / f".retired-step_{step:08d}")
        retired = sorted(self.root.glob(".retired-*"))  # with leftovers of a process that was killed
        if retired:
            self._deleting = threading.Thread(target=lambda: [shutil.rmtree(p, ignore_errors=True) for p in retired],
                                              name="distrain-retire", daemon=True)
            self._deleting.start()

    def wait_for_deletions(self) -> None:
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None

    def latest_path(self) -> str | None:
        latest = self.root / "latest"
        return str(self.root / latest.read_text().strip()) if latest.exists() else None

    # -- resuming
    def maybe_resume(self) -> Path | None:
        """Collective: load the newest readable checkpoint into what is tracked; its path, or None."""
        resume = self.section.resume
        if resume == "never":
            return None
        candidates = [Path(resume)] if resume != "auto" else self._candidates()
        for path in candidates:
            if not (path / "trainer.pt").exists() and (path / "latest").exists():
                path = path / (path / "latest").read_text().strip()
            problem = self._try_load(path)
            if problem is None:
                return path
            if resume != "auto":
                raise ConfigError("checkpoint.resume", f"cannot load {path}: {problem}")
            log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path, problem)
        if candidates:
            raise RuntimeError(f"no readable checkpoint under {self.root}")
        return None

    def _candidates(self) -> list[Path]:
        steps = [self.root / f"step_{s:08d}" for s in reversed(committed_steps(self.root))]
        latest = self.root / "latest"
        if latest.exists():
            named = self.root / latest.read_text().strip()
            if named in steps:  # `latest` first; it is normally the newest anyway
                steps.remove(named)
                steps.insert(0, named)
        return steps

    def _try_load(self, path: Path) -> str | None:
        """Load on every rank; all agree on success, else all move on to the next candidate.

        The CRC check reads every byte, as the load does: it runs beside the load, and a
        mismatch found afterwards discards what was loaded like any other failed load (the next
        candidate overwrites all of it)."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            problem = check_manifest(path)
            crc = pool.submit(verify_crc, path) if problem is None else None
            problem = self._load(path, problem)
            if problem is None:
                problem = crc.result()
        if not self.comm.agree(problem is None):
            return problem or "another rank could not load it"
        return None

    def _load(self, path: Path, problem: str | None) -> str | None:
        """Collective: every rank comes here, also with a problem already found."""
        if problem is None:
            try:
                vet_files(path)
                meta = safe_load(path / "trainer.pt")
            except UnsafeCheckpointError as e:
                raise ConfigError("checkpoint.resume", str(e))
            except Exception as e:  # noqa: BLE001 - any unreadable file means: try the previous checkpoint
                problem = f"{type(e).__name__}: {e}"
            else:
                self._check_compatible(meta, path)
        if not self.comm.agree(problem is None):
            return problem or "another rank could not read it"
        try:
            self.files.load(path)
            for key, obj in self.states.items():
                obj.load_state_dict(meta[key])
            rng.restore(path / "rng", self.env.rank, self.env.world_size == meta["world_size"])
        except UnsafeCheckpointError as e:
            raise ConfigError("checkpoint.resume", str(e))
        except Exception as e:
            log.debug("loading %s failed", path, exc_info=True)
            return f"{type(e).__name__}: {e}"
        return None

    def _check_compatible(self, meta: dict, path: Path) -> None:
        if meta["format"] != self.format:
            raise ConfigError("strategy.name", f"{path} was written in the '{meta['format']}' format, strategy "
                                               f"{self.config['strategy']['name']} reads '{self.format}'; export it first")
        for key, obj in self.states.items():  # a tracked object may refuse what the checkpoint recorded
            if hasattr(obj, "check_compatible"):
                obj.check_compatible(meta.get(key))
        if self.section.allow_config_change:
            return
        changed = config_changes(meta["config"], self.config)
        if changed:
            raise ConfigError(changed[0], f"differs from the checkpoint {path} in {', '.join(changed)}; this changes "
                                          "the optimization (set checkpoint.allow_config_change=true to accept)")

    # -- export
    def export_final(self, state: dict) -> Path:
        """The plain model state (complete on rank 0) as final/model.pt."""
        self.wait_for_deletions()
        out = self.run_dir / "final" / "model.pt"
        if self.env.is_main:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".pt.tmp")
            torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
            os.replace(tmp, out)
        dist.barrier()
        return out


def committed_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())


def weights_finite(module, comm) -> bool:
    """Collective (comm: dist.Collectives, or a device for a lone process). A per-tensor
    isfinite check over every local weight shard: no temporary the size of the model, and no
    sum that huge finite weights could overflow."""
    from .strategies.common import all_finite

    local = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    local = [t.detach() for t in local if t.numel() and t.is_floating_point()]
    ok = all_finite(local)
    return comm.agree(ok) if hasattr(comm, "agree") else ok
