"""Progress on rank 0: a tqdm bar on a terminal, plain periodic log lines elsewhere
(SLURM output files, CI), chosen by `log.progress: auto | on | off`."""
from __future__ import annotations

import logging


class Progress:
    def __init__(self, mode: str, interactive: bool, is_main: bool, total: int, initial: int):
        self.bar = None
        if is_main and (mode == "on" or (mode == "auto" and interactive)):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            # log lines print above the bar instead of breaking it
            for h in logging.getLogger("distrain").handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    h.setStream(_TqdmStream(h.stream))

    @property
    def active(self) -> bool:
        return self.bar is not None

    def update(self, step: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _TqdmStream:
    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        from tqdm import tqdm

        if text.strip():
            tqdm.write(text.rstrip("\n"), file=self.stream)

    def flush(self) -> None:
        self.stream.flush()
