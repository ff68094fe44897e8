"""The `distrain` console script: train, export, plot, prepare."""
from __future__ import annotations

import sys

USAGE = """usage: distrain {train,export,plot,prepare} ...

  train  --config FILE [key=value ...]        train (same as python -m distrain.train)
  export CHECKPOINT_DIR OUT [--format F]      a checkpoint's model as pt, safetensors or hf (save_pretrained)
  plot   RUN_DIR [RUN_DIR ...] --out FILE.png loss, accuracy and throughput curves
  prepare --tokenizer T.json --out DIR FILE.. tokenize text/JSONL/Parquet into a token corpus
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
    if command == "prepare":
        from .prepare import main as prepare

        return prepare(rest)
    print(f"distrain: error: unknown command '{command}'\n{USAGE}", file=sys.stderr, end="")
    return 2


def console() -> None:
    """The installed `distrain` command: ends the process as `python -m distrain.train` does."""
    from .train import end_process

    end_process(main())
