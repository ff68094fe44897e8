"""Checkpoints: what is saved, the commit protocol, retention and resume.

A checkpoint directory holds the strategy's own files (model.pt, dcp/ or deepspeed/),
`trainer.pt` (step, data position, resolved config) and `rng/rank{R}.pt`. It is written
under checkpoints/.tmp-step_N, and only after every rank is done does rank 0 rename it
to checkpoints/step_N and then atomically rewrite checkpoints/latest. A directory that
was never renamed is never loaded, so a kill at any moment leaves the last good one.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import torch

from . import dist, rng
from .checkpoint_io import UnsafeCheckpointError, safe_load, verify_crc, vet_files
from .config import ConfigError, to_dict

log = logging.getLogger("distrain")

STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMATS = {"single": "full", "dp": "full", "ddp": "full", "fsdp": "dcp", "deepspeed": "deepspeed"}
# keys whose change alters the optimization; the world size and micro batch may change freely
OPTIMIZATION_KEYS = ("model", "optim", "sched", "run.seed", "data.name", "data.global_batch_size",
                     "train.grad_clip", "train.precision")
RUNTIME_DATA_KEYS = {"root", "download", "micro_batch_size", "eval_batch_size", "num_workers"}


class Checkpointer:
    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        self.root = cfg.run_dir / "checkpoints"
        self.format = FORMATS[cfg.strategy.name]
        self._pending = None  # an async save waiting to be committed
        self._deleting: threading.Thread | None = None  # checkpoints past keep_last, removed in the background
        if cfg.checkpoint.async_save and self.format != "dcp":
            raise ConfigError("checkpoint.async_save", "needs strategy.name=fsdp (sharded DCP checkpoints)")

    # -- before the process group exists
    def check_run_dir(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume == "never" and committed_steps(self.root) and not self.cfg.run.overwrite:
            raise ConfigError("checkpoint.resume", f"{self.cfg.run_dir} already holds checkpoints; use resume=auto to "
                                                   "continue it, run.overwrite=true to start over, or another run.name")
        if resume not in ("auto", "never") and not Path(resume).exists():
            raise ConfigError("checkpoint.resume", f"no checkpoint at {resume}")
        if resume == "never" and self.cfg.run.overwrite and self.env.is_main and self.root.exists():
            shutil.rmtree(self.root)

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every_steps
        return bool(every) and step % every == 0

    # -- saving
    def save(self, trainer, final: bool = False) -> Path:
        self.commit_pending()
        step = trainer.step
        name = f"step_{step:08d}"
        if (self.root / name).exists():  # already committed (e.g. resumed from the final checkpoint)
            return self.root / name
        if not weights_finite(trainer.strategy.module, trainer.comm_device):
            raise FloatingPointError(f"refusing to write checkpoint {name}: the model holds non-finite weights")
        tmp = self.root / f".tmp-{name}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
        dist.barrier()
        torch.save(rng.capture(), tmp / "rng" / f"rank{self.env.rank}.pt")
        if self.env.is_main:
            torch.save({"trainer": trainer.state_dict(), "config": to_dict(self.cfg), "format": self.format,
                        "world_size": self.env.world_size}, tmp / "trainer.pt")
        if self.cfg.checkpoint.async_save and not final:
            self._pending = (tmp, name, trainer.strategy.save_async(tmp))
            return self.root / name
        trainer.strategy.save(tmp)
        return self._commit(tmp, name)

    def commit_pending(self) -> None:
        if self._pending is not None:
            tmp, name, future = self._pending
            self._pending = None
            future.result()
            self._commit(tmp, name)

    def _commit(self, tmp: Path, name: str) -> Path:
        dist.barrier()  # every rank's files are on disk
        final = self.root / name
        if self.env.is_main:
            write_manifest(tmp)
            _fsync_tree(tmp)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_text(self.root / "latest", name + "\n")
            self._retain(name)
            log.info("checkpoint %s committed", final)
        dist.barrier()
        return final

    def _retain(self, newest: str) -> None:
        """Retire checkpoints past keep_last: a rename now (they are gone from the candidates at
        once), the deletion in the background (unlinking gigabytes is slow on many filesystems)."""
        self.wait_for_deletions()
        keep = self.cfg.checkpoint.keep_last
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
    def maybe_resume(self, trainer) -> bool:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return False
        candidates = [Path(resume)] if resume != "auto" else self._candidates()
        for path in candidates:
            if not (path / "trainer.pt").exists() and (path / "latest").exists():
                path = path / (path / "latest").read_text().strip()
            problem = self._try_load(path, trainer)
            if problem is None:
                log.info("resumed from %s at step %d (epoch %d, %d samples into it)", path, trainer.step,
                         trainer.sampler.epoch, trainer.sampler.position)
                return True
            if resume != "auto":
                raise ConfigError("checkpoint.resume", f"cannot load {path}: {problem}")
            log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", path, problem)
        if candidates:
            raise RuntimeError(f"no readable checkpoint under {self.root}")
        return False

    def _candidates(self) -> list[Path]:
        steps = [self.root / f"step_{s:08d}" for s in reversed(committed_steps(self.root))]
        latest = self.root / "latest"
        if latest.exists():
            named = self.root / latest.read_text().strip()
            if named in steps:  # `latest` first; it is normally the newest anyway
                steps.remove(named)
                steps.insert(0, named)
        return steps

    def _try_load(self, path: Path, trainer) -> str | None:
        """Load on every rank; all agree on success, else all move on to the next candidate.

        The CRC check reads every byte, as the load does: it runs beside the load, and a
        mismatch found afterwards discards what was loaded like any other failed load (the next
        candidate overwrites all of it)."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            problem = check_manifest(path)
            crc = pool.submit(verify_crc, path) if problem is None else None
            problem = self._load(path, trainer, problem)
            if problem is None:
                problem = crc.result()
        if not agree(problem is None, trainer.comm_device):
            return problem or "another rank could not load it"
        return None

    def _load(self, path: Path, trainer, problem: str | None) -> str | None:
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
        if not agree(problem is None, trainer.comm_device):
            return problem or "another rank could not read it"
        try:
            trainer.strategy.load(path)
            trainer.load_state_dict(meta["trainer"])
            rng.restore(path / "rng", self.env.rank, self.env.world_size == meta["world_size"])
        except UnsafeCheckpointError as e:
            raise ConfigError("checkpoint.resume", str(e))
        except Exception as e:  # noqa: BLE001
            log.debug("loading %s failed", path, exc_info=True)
            return f"{type(e).__name__}: {e}"
        return None

    def _check_compatible(self, meta: dict, path: Path) -> None:
        if meta["format"] != self.format:
            raise ConfigError("strategy.name", f"{path} was written in the '{meta['format']}' format, strategy "
                                               f"{self.cfg.strategy.name} reads '{self.format}'; export it first")
        if self.cfg.checkpoint.allow_config_change:
            return
        changed = config_changes(meta["config"], to_dict(self.cfg))
        if changed:
            raise ConfigError(changed[0], f"differs from the checkpoint {path} in {', '.join(changed)}; this changes "
                                          "the optimization (set checkpoint.allow_config_change=true to accept)")

    # -- export
    def export_final(self, strategy) -> Path:
        self.wait_for_deletions()
        state = strategy.full_model_state()  # collective
        out = self.cfg.run_dir / "final" / "model.pt"
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


def config_changes(old: dict, new: dict) -> list[str]:
    changed = []
    for key in OPTIMIZATION_KEYS:
        section, _, field = key.partition(".")
        a, b = old.get(section, {}), new.get(section, {})
        if field:
            a, b = a.get(field), b.get(field)
            if a != b:
                changed.append(key)
        else:
            changed += [f"{section}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    a, b = old.get("data", {}), new.get("data", {})
    changed += [f"data.{k}" for k in sorted(set(a) | set(b))
                if k not in RUNTIME_DATA_KEYS and f"data.{k}" not in changed and a.get(k) != b.get(k)]
    return changed


def weights_finite(module, comm_device) -> bool:
    """Collective. GradScaler's fused check over every weight (scaling by exactly 1, which
    changes no value): one pass, no temporary the size of the model, and no sum that huge
    finite weights could overflow."""
    from .strategies.common import all_finite

    local = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    local = [t.detach() for t in local if t.numel() and t.is_floating_point()]
    bad = torch.tensor([0.0 if not local or all_finite(local) else 1.0], device=comm_device)
    return dist.all_reduce_sum(bad).item() == 0


def agree(ok: bool, comm_device) -> bool:
    flag = torch.tensor([0.0 if ok else 1.0], device=comm_device)
    return dist.all_reduce_sum(flag).item() == 0


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
    _fsync_dir(path.parent)


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
