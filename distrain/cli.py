"""The `distrain` console script: train, export, plot."""
from __future__ import annotations

import sys

USAGE = """usage: distrain {train,export,plot} ...

  train  --config FILE [key=value ...]        train (same as python -m distrain.train)
  export CHECKPOINT_DIR OUT.pt                write a checkpoint's model as a plain state_dict
  plot   RUN_DIR [RUN_DIR ...] --out FILE.png loss, accuracy and throughput curves
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train

        return train(rest)
    if command == "export":
        from .export import main as export

        return export(rest)
    if command == "plot":
        from .plot import main as plot

        return plot(rest)
    print(f"distrain: error: unknown command '{command}'\n{USAGE}", file=sys.stderr, end="")
    return 2


def console() -> None:
    """The installed `distrain` command: ends the process as `python -m distrain.train` does."""
    from .train import end_process

    end_process(main())
