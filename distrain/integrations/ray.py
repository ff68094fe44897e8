"""distrain under Ray Train's TorchTrainer: Ray creates the worker processes and the process group,
distrain runs its training loop in each worker unchanged.

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from distrain.integrations.ray import fit
    result = fit("configs/digits_mlp.yaml", ["run.dir=/shared/runs/digits"], ScalingConfig(num_workers=8, use_gpu=True),
                 RunConfig(storage_path="/shared/ray", failure_config=FailureConfig(max_failures=3)))
    result.checkpoint.path   # the newest committed distrain checkpoint, reported to Ray

    python -m distrain.ray --config configs/digits_mlp.yaml --workers 8 --gpu run.dir=/shared/runs/digits

`train_loop` is the per-worker function, for a TorchTrainer of your own:
`TorchTrainer(train_loop, train_loop_config={"config": PATH, "overrides": [...]}, ...)`.

run.dir must be on storage every worker shares. When a worker dies, Ray (FailureConfig) restarts
the whole group, and distrain resumes from the newest committed checkpoint in run.dir, exactly;
a restart with fewer workers (ScalingConfig(num_workers=(min, max)), or a new fit with fewer)
resumes on the smaller world size with every sample seen once. Ray owns the workers' lifecycle,
so distrain installs no preemption signal handlers under it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import ConfigError

INSTALL_HINT = "Ray Train is not installed: pip install distrain[ray]"


def _ray_train():
    try:
        import ray.train
        import ray.train.torch
    except ImportError as e:
        raise ConfigError("", f"{INSTALL_HINT} ({e})") from None
    return ray.train


def _resolved(config_path, overrides) -> tuple[str, list[str]]:
    """The config as the workers must load it: an absolute path and an absolute run directory,
    whatever their working directory (validated here, before Ray starts anything)."""
    from ..config import load_config

    cfg = load_config(config_path, list(overrides))
    return str(Path(config_path).resolve()), [*overrides, f"run.dir={Path(cfg.run_dir).resolve()}"]


def check_world_sizes(config_path, overrides, num_workers) -> None:
    """Every world size the scaling config allows must split the config's batch (else exit 2)."""
    from ..config import batch_layout, load_config

    cfg = load_config(config_path, list(overrides))
    low, high = (num_workers, num_workers) if isinstance(num_workers, int) else num_workers
    for world_size in range(low, high + 1):
        batch_layout(cfg, world_size)


def fit(config_path, overrides=(), scaling_config=None, run_config=None):
    """Train under a TorchTrainer; returns Ray's Result (its checkpoint: the newest distrain one)."""
    train = _ray_train()
    scaling_config = scaling_config or train.ScalingConfig(num_workers=1)
    check_world_sizes(config_path, overrides, scaling_config.num_workers)
    path, overrides = _resolved(config_path, overrides)
    trainer = train.torch.TorchTrainer(train_loop, train_loop_config={"config": path, "overrides": overrides},
                                       scaling_config=scaling_config, run_config=run_config)
    return trainer.fit()


def train_loop(loop_config: dict) -> None:
    """One Ray Train worker: distrain's run in the process group Ray made, on the device Ray chose."""
    train = _ray_train()
    from ..cluster import ClusterEnv
    from ..config import load_config
    from ..train import run

    context = train.get_context()
    device = train.torch.get_device()
    env = ClusterEnv(rank=context.get_world_rank(), world_size=context.get_world_size(),
                     # the device index distrain drives: Ray narrows each worker's visible GPUs
                     local_rank=device.index if device.type == "cuda" else context.get_local_rank(),
                     local_world_size=context.get_local_world_size(), node_rank=context.get_node_rank(),
                     kind="ray", platform="ray")
    # signal handlers belong to the main thread, and Ray runs this function in another
    cfg = load_config(loop_config["config"], [*loop_config.get("overrides", []), "checkpoint.preempt_signals=[]"])
    try:
        code = run(cfg, env)
    except ConfigError as e:  # as itself it would not survive Ray's pickling
        raise ValueError(f"distrain: error: {e}") from None
    if code != 0:  # a failure Ray's FailureConfig can retry; the traceback is in the rank's log
        raise RuntimeError(f"distrain exited with code {code} on rank {env.rank}; see "
                           f"{cfg.run_dir / 'logs' / f'rank{env.rank}.log'}")
    _report(train, cfg.run_dir, env.rank)


def _report(train, run_dir: Path, rank: int) -> None:
    """The run's result to Ray: its newest committed checkpoint (rank 0's report carries it), where
    it lies when that is inside Ray's storage, else copied there."""
    latest = run_dir / "checkpoints" / "latest"
    checkpoint_dir = run_dir / "checkpoints" / latest.read_text().strip() if latest.exists() else None
    metrics = {"run_dir": str(run_dir), "checkpoint": str(checkpoint_dir), "model": str(run_dir / "final" / "model.pt")}
    if rank != 0 or checkpoint_dir is None:
        train.report(metrics)
        return
    storage = Path(train.get_context().get_storage().experiment_fs_path)
    inside = checkpoint_dir.resolve().is_relative_to(storage.resolve())
    mode = train.CheckpointUploadMode.NO_UPLOAD if inside else train.CheckpointUploadMode.SYNC
    train.report(metrics, checkpoint=train.Checkpoint.from_directory(str(checkpoint_dir)), checkpoint_upload_mode=mode,
                 delete_local_checkpoint_after_upload=False)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m distrain.ray", description="Train with distrain under Ray Train.")
    p.add_argument("--config", "-c", required=True, help="YAML config file")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (one per GPU with --gpu)")
    p.add_argument("--min-workers", type=int, default=None, help="elastic: restart with as few as this many")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl); CPU workers (gloo) otherwise")
    p.add_argument("--max-failures", type=int, default=3, help="worker group restarts before giving up")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or a local Ray)")
    p.add_argument("--storage", default=None, help="Ray's storage path for results (shared by all nodes)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, values parsed as YAML")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train = _ray_train()
        num_workers = args.workers if args.min_workers is None else (args.min_workers, args.workers)
        check_world_sizes(args.config, args.overrides, num_workers)
        import ray

        ray.init(address=args.address)
        result = fit(args.config, args.overrides, train.ScalingConfig(num_workers=num_workers, use_gpu=args.gpu),
                     train.RunConfig(storage_path=args.storage,
                                     failure_config=train.FailureConfig(max_failures=args.max_failures)))
    except ConfigError as e:
        print(f"distrain: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - Ray gave up on the run: its error, in one line
        print(f"distrain: training failed under Ray: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    print(f"distrain: done; checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
