"""`python -m distrain.launcher --config FILE [key=value ...]`: one node (pod) of a Kubernetes job
(Kubeflow TrainJob or PyTorchJob, an Indexed Job). It runs torchrun, placed in the job from the variables
the platform sets (distrain.cluster.torchrun_arguments; other torchrun options through torchrun's
own PET_* variables, e.g. PET_MAX_RESTARTS), and gives the pod the exit code the manifests act on:

  0  done
  3  stopped after a preemption signal (SIGTERM to this process, as a pod deletion, a drain or a
     Kueue preemption sends it; or another node's), with a checkpoint to resume from: restart me
  2  a config mistake, also a world size that does not split the batch (one line on stderr)
  1  anything else

torchrun passes the signal on to its workers once and reaps them; they checkpoint at the next
step boundary and exit 3. torchrun waits for them at most its shutdown timeout (PET_SHUTDOWN_TIMEOUT,
30 s by default; the manifests set it just under the pod's grace period) before killing them: a
checkpoint that takes longer is lost, and the restart resumes from the one before.
"""
from __future__ import annotations

import sys

from .config import ConfigError
from .train import PREEMPTED_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .cluster import torchrun_arguments

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args([*torchrun_arguments(), "-m", "distrain.train", *argv])
    try:
        check_world_size(args.nnodes, args.nproc_per_node, argv)
    except ConfigError as e:  # before any pod waits for another
        print(f"distrain: error: {e}", file=sys.stderr)
        return 2
    try:
        run(args)
    except ChildFailedError as e:
        # torchrun reports the ranks that had ended when it noticed; after a preemption all end with 3
        codes = {failure.exitcode for failure in e.failures.values()}
        return PREEMPTED_EXIT_CODE if codes == {PREEMPTED_EXIT_CODE} else (2 if codes == {2} else 1)
    except SignalException as e:
        print(f"distrain.launcher: stopped by {e.sigval.name}; the workers were asked to checkpoint", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def check_world_size(nnodes: str, nproc_per_node: str, argv: list[str]) -> None:
    """The job's world size must split the config's batch (ConfigError, exit 2, otherwise). Known
    here when the node and process counts are numbers; else each rank checks it as it starts."""
    from .config import batch_layout, load_config
    from .train import parse_args as parse_train_args

    if not (str(nnodes).isdigit() and str(nproc_per_node).isdigit()):
        return
    train_args = parse_train_args(argv)
    batch_layout(load_config(train_args.config, train_args.overrides), int(nnodes) * int(nproc_per_node))


if __name__ == "__main__":
    sys.exit(main())
