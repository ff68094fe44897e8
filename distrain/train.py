"""`python -m distrain.train --config FILE [key=value ...]`: parse -> config -> cluster -> build -> fit.

Exit codes: 0 done; 2 bad config or usage (one line on stderr); 1 a failure during
training (traceback in the rank's log); PREEMPTED_EXIT_CODE after a preemption
checkpoint, asking the scheduler to requeue.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import traceback
import warnings

PREEMPTED_EXIT_CODE = 3  # checkpointed after a preemption signal: requeue me


def parse_args(argv):
    p = argparse.ArgumentParser(prog="distrain train", description="Train a model with distrain.")
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, values parsed as YAML")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from .cluster import detect
    from .config import ConfigError, load_config, to_yaml
    from .strategies import spec

    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = detect()
    try:
        cfg = load_config(args.config, args.overrides)
        spec(cfg.strategy.name).check(cfg)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        return run(cfg, env)
    except ConfigError as e:
        if env.is_main:
            print(f"distrain: error: {e}", file=sys.stderr)
        return 2


def run(cfg, env) -> int:
    import torch

    from . import dist, weights
    from .checkpoint import Checkpointer
    from .checkpoint_io import CheckpointWriteError
    from .export import write_final
    from .config import ConfigError, batch_layout, to_dict, to_yaml
    from .data import build_datasets
    from .log import MetricsWriter, close_logging, log_file_stream, setup_logging
    from .models import build_model
    from .models.empty import build_for_run, has_meta_parameters, materialize
    from .optim import build_optimizer
    from .preempt import Preemption
    from .rundir import space_warning
    from .strategies import StrategyContext, spec
    from .trainer import Data, Parts, Trainer
    from .watchdog import Watchdog

    strategy_spec = spec(cfg.strategy.name)
    strategy_spec.check(cfg, env.world_size)
    micro, accumulation = batch_layout(cfg, env.world_size)
    device = dist.choose_device(env, cfg.train.device, strategy_spec.first_gpu)
    backend = dist.choose_backend(cfg.strategy.backend, device.type == "cuda", collective=strategy_spec.needs_group)
    _check_hardware(cfg, device, backend)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    checkpointer = Checkpointer(cfg.checkpoint, cfg.run_dir, env, strategy_spec.checkpoint_format, to_dict(cfg))
    checkpointer.check_run_dir()  # before any process waits on another: a refusal is a config error
    with warnings.catch_warnings(record=True) as early_warnings:  # shown once logging knows the rank
        warnings.simplefilter("default")
        train_set, eval_set, meta = build_datasets(cfg.data)
        # a model the init files fill is built without its parameters' memory; a bad file: exit 2 here
        module, init = build_for_run(lambda empty: build_model(cfg.model, meta, cfg.train.activation_checkpointing,
                                                               empty), cfg.model, cfg.checkpoint, checkpointer.root)

    dist.init(env, backend, device, cfg.strategy.timeout_s, needs_group=strategy_spec.needs_group)
    comm = dist.Collectives(device if backend == "nccl" else torch.device("cpu"),
                            host=_host_group(cfg, device) if dist.active() else None)
    run_dir = cfg.run_dir
    lock, cleared = _claim_run_dir(cfg, env, comm, checkpointer)  # before anything is written there
    log = setup_logging(run_dir, env.rank, env.world_size, cfg.log.level)
    for w in early_warnings:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    for note in lock.notes if lock else ():
        log.warning("%s", note)
    if cleared:
        log.info("removed what interrupted saves left in %s: %s", checkpointer.root, ", ".join(cleared))
    if env.is_main and (short_of_space := space_warning(checkpointer.root)):
        log.warning("%s", short_of_space)
    metrics = watchdog = preemption = None
    failed = False
    try:
        log.info("distrain: %s on %d process(es) (%s), %s/%s, micro batch %d x %d accumulation, run dir %s",
                 cfg.strategy.name, env.world_size, env.platform, device, backend if env.distributed else "-", micro,
                 accumulation, run_dir)
        _seed_everything(cfg.run.seed + env.rank)
        ctx = StrategyContext(cfg.strategy, env, device, backend, comm, micro, accumulation,
                              cfg.data.global_batch_size, cfg.train.precision, cfg.train.compile,
                              cfg.train.grad_clip, cfg.checkpoint.async_save)
        strategy = strategy_spec.build(ctx)
        empty = has_meta_parameters(module)  # the strategy's setup reads only what each rank holds
        if empty and not strategy_spec.builds_empty(cfg.strategy):  # the strategy takes it whole: allocated here
            materialize(module, device)
            empty = False
        if init and not empty:
            init.load(module)
        strategy.setup(module, lambda params, fused=False: build_optimizer(cfg.optim, params, fused),
                       init if empty else None)
        metrics = MetricsWriter(run_dir, env.is_main, cfg.log.tensorboard)
        preemption = Preemption(cfg.checkpoint.preempt_signals, comm.stop_agreement())
        watchdog = Watchdog(cfg.log.watchdog_s, env.rank, env.world_size, dist.default_store(), log_file_stream()) \
            if cfg.log.watchdog_s else None
        trainer = Trainer(cfg, strategy, Data(train_set, eval_set, meta, micro, device),
                          Parts(comm, checkpointer, metrics, preemption, watchdog), interactive=env.interactive)
        checkpointer.track(comm, strategy, trainer=trainer, **weights.frozen_source(init, module))

        def record_config():  # once a resume is accepted: a refused one leaves the run's own config in place
            if env.is_main:
                (run_dir / "config.yaml").write_text(to_yaml(cfg))

        summary = trainer.fit(on_start=record_config)
        if summary["preempted"]:
            checkpointer.wait_for_deletions()
            log.warning("exiting with code %d: checkpointed after a preemption signal; requeue to resume",
                        PREEMPTED_EXIT_CODE)
            return PREEMPTED_EXIT_CODE
        final_state = strategy.full_state()  # collective
        final_state = write_final(final_state, strategy.module, run_dir / "final", env.is_main)
        checkpointer.export_final(final_state)  # collective
        _log_summary(log, summary, run_dir)
        return 0
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes exit 1 with the traceback in the log
        failed = True
        if preemption is not None:  # a launcher tearing the job down now gets the default SIGTERM
            preemption.uninstall()
        log.debug("%s", traceback.format_exc())
        if isinstance(e, CheckpointWriteError):  # the storage, not the code: the message is the whole story
            log.error("training stopped on rank %d: %s", env.rank, e)
            return 1
        logging.getLogger("distrain").error("training failed on rank %d: %s: %s (traceback in %s)", env.rank,
                                            type(e).__name__, e, run_dir / "logs" / f"rank{env.rank}.log")
        return 1
    finally:
        for closable in (watchdog, metrics):
            if closable is not None:
                closable.close()
        if preemption is not None:
            preemption.uninstall()
        # after a failure a peer may be gone: tearing the group down could wait for it
        if not (failed and env.world_size > 1):
            dist.shutdown()
        close_logging()
        if lock is not None:
            lock.release()


def _claim_run_dir(cfg, env, comm, checkpointer):
    """Global rank 0 takes the run directory's lock (waiting run.lock_wait_s for a predecessor that is
    still exiting) and clears what interrupted saves left; the other ranks follow its decision, so a
    refusal is exit 2 on every rank. Returns (the lock on rank 0 else None, the names removed)."""
    from . import dist
    from .config import ConfigError
    from .rundir import RunDirLock, clear_for_start

    # the other ranks wait for rank 0's answer in a collective, which gives up after strategy.timeout_s
    wait_s = cfg.run.lock_wait_s if env.world_size == 1 else min(cfg.run.lock_wait_s, cfg.strategy.timeout_s / 2)

    def waiting(holder):
        print(f"distrain: {cfg.run_dir} is in use by {holder}; waiting up to {wait_s:g} s for it to exit", flush=True)

    lock, cleared, refusal = None, [], None
    if env.is_main:
        try:
            lock = RunDirLock.acquire(cfg.run_dir, wait_s, on_wait=waiting)
            start_over = cfg.checkpoint.resume == "never" and cfg.run.overwrite
            cleared = clear_for_start(checkpointer.root, start_over)
        except ConfigError as e:
            refusal = e
        except OSError as e:
            refusal = ConfigError("run.dir", f"cannot prepare {cfg.run_dir}: {e.strerror or e}")
    if not comm.agree(refusal is None):
        if lock is not None:
            lock.release()
        dist.shutdown()
        raise refusal or ConfigError("run.dir", f"{cfg.run_dir} is in use (rank 0 names the holder)")
    return lock, cleared


def _host_group(cfg, device):
    """The shared-memory group of CPU ranks that all share this machine (strategy.shared_memory), or None."""
    import torch.distributed as tdist

    if not (cfg.strategy.shared_memory and device.type == "cpu" and tdist.get_backend() == "gloo"
            and tdist.get_world_size() > 1):
        return None
    from .shm import HostGroup

    return HostGroup.create(cfg.strategy.timeout_s)


def _log_summary(log, s: dict, run_dir) -> None:
    best = s["best_eval"] or {}
    metric = "accuracy" if "accuracy" in best else "loss"
    log.info("summary: %d steps (%d in this run) in %.1f s, %.0f samples/s, %d skipped; best eval %s %.4f at step %s; "
             "checkpoint %s; model %s", s["steps"], s["steps_this_run"], s["wall_s"], s["samples_per_s"] or 0,
             s["skipped_steps"], metric, best.get(metric, float("nan")), best.get("step"), s["checkpoint"],
             run_dir / "final" / "model.pt")


def _check_hardware(cfg, device, backend) -> None:
    import torch

    from .config import ConfigError

    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision", "fp16 needs a CUDA device; use bf16 on CPU")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("strategy.backend", "nccl needs CUDA devices; use gloo or auto")
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "cuda requested but no CUDA device is available")


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def end_process(code: int):
    """Exit without the interpreter's teardown, as multiprocessing's child processes do.

    torch's DTensor caches keep a gloo process group, and its worker threads, alive past
    destroy_process_group into finalization; a worker still freeing the last collective's
    tensors then needs the GIL and aborts the process (SIGABRT after a successful run).
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    end_process(main())
