"""A test-only GPT that dies at a chosen forward and records the token windows it trains on
(`model.name=tests.lm_faults:recording_gpt`), so tests can check resume and exactly-once."""
from __future__ import annotations

from torch import nn

from distrain.models.gpt import gpt

from tests.faults import KillSwitch, _rank


class WindowRecorder(nn.Module):
    def __init__(self, inner: nn.Module, record: str):
        super().__init__()
        self.inner, self.record = inner, record

    def forward(self, x):
        if self.training and self.record:
            with open(f"{self.record}.rank{_rank()}", "a") as f:
                f.writelines(" ".join(map(str, row)) + "\n" for row in x.tolist())
        return self.inner(x)


def recording_gpt(vocab_size: int, seq_len: int, kill_at: int = -1, marker: str = "", record: str = "",
                  n_layer: int = 2, n_head: int = 2, d_model: int = 32):
    net = KillSwitch(gpt(vocab_size, seq_len, n_layer, n_head, d_model), kill_at, -1, -1, marker, "")
    return WindowRecorder(net, record)


def recorded_rows(record_prefix) -> list[tuple[int, ...]]:
    from pathlib import Path

    prefix = Path(record_prefix)
    return [tuple(int(t) for t in line.split()) for f in sorted(prefix.parent.glob(prefix.name + ".rank*"))
            for line in f.read_text().splitlines()]
