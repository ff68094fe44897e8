"""The loop's parts on their own (one process): the loader, the phase timer, the collectives of a
lone process, and the checkpointer driving what it is given to track."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from conftest import CONFIGS


class Listed(Dataset):
    """Map-style, not a TensorDataset: batches come through a DataLoader (with workers when asked)."""

    def __init__(self, n: int):
        self.x = torch.arange(n * 2, dtype=torch.float32).view(n, 2)
        self.y = torch.arange(n)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _loader(dataset, workers: int):
    from distrain.data.loader import StepLoader
    from distrain.data.sampler import ResumableSampler

    sampler = ResumableSampler(len(dataset), 12, 3, world_size=2, rank=1, seed=5)
    return StepLoader(dataset, sampler, torch.device("cpu"), workers, seed=5, rank=1), sampler


def _targets(loader, steps: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        step, micro = loader.next_step()
        assert len(micro) == len(step.micro_batches)
        out.append([int(v) for _, y in micro for v in y])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_the_samplers_indices_and_resumes_mid_epoch(workers):
    """In-memory tensors (indexed directly) and a map-style set through DataLoader workers give
    this rank's samples in the sampler's order; restoring the sampler's state mid-epoch continues
    exactly where an uninterrupted loader would be."""
    n = 50
    direct, sampler = _loader(TensorDataset(*Listed(n)[:]), 0)
    expected = [[int(i) for m in sampler_step.micro_batches for i in m] for sampler_step in _steps(n, 9)]
    assert _targets(direct, 9) == expected
    loader, sampler = _loader(Listed(n), workers)
    first = _targets(loader, 4)
    state = sampler.state_dict()  # what a checkpoint after step 4 holds
    rest = _targets(loader, 5)
    loader.close()
    assert first + rest == expected
    again, sampler = _loader(Listed(n), workers)
    sampler.load_state_dict(state)
    again.reset()
    assert _targets(again, 5) == rest
    again.close()


def _steps(n: int, count: int):
    from distrain.data.sampler import ResumableSampler

    sampler = ResumableSampler(n, 12, 3, world_size=2, rank=1, seed=5)
    return [sampler.next_step() for _ in range(count)]


def test_phase_timer_sets_the_watchdogs_phase_and_sums_the_phases_asked_for(monkeypatch):
    import time

    from distrain import watchdog as wd

    clock = [0.0]
    monkeypatch.setattr(wd, "time", SimpleNamespace(perf_counter=lambda: clock[0], monotonic=time.monotonic))
    watchdog = SimpleNamespace(phase=None)
    phases = wd.Phases(watchdog)
    for name, seconds in (("data", 1.0), ("forward", 2.0), ("backward", 4.0), ("forward", 8.0)):
        with phases(name):
            assert watchdog.phase == name
            clock[0] += seconds
    assert phases.seconds == {"data": 1.0, "forward": 10.0, "backward": 4.0}
    assert phases.take("data", "forward") == 11.0 and phases.seconds == {}
    with pytest.raises(RuntimeError), phases("optimizer"):  # an exception still books the time
        clock[0] += 0.5
        raise RuntimeError
    assert phases.take("optimizer") == 0.5


def test_collectives_of_a_lone_process():
    from distrain.dist import Collectives, LocalAgreement

    comm = Collectives(torch.device("cpu"))
    t = torch.tensor([1.5, 2.0])
    assert comm.all_reduce_sum(t) is t and t.tolist() == [1.5, 2.0]
    assert comm.agree(True) and not comm.agree(False)
    agreement = comm.stop_agreement()
    assert isinstance(agreement, LocalAgreement)
    assert not agreement.should_stop(False) and agreement.should_stop(True)


class Files:
    """A stand-in strategy: writes and reads one file of its own in the checkpoint directory."""

    def __init__(self, value: float):
        self.value = value

    def save(self, path, blocking=True):
        torch.save({"value": torch.tensor(self.value)}, path / "files.pt")

    def load(self, path):
        self.value = torch.load(path / "files.pt", weights_only=True)["value"].item()


class Counter:
    def __init__(self, count: int):
        self.count = count

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def _checkpointer(run_dir, files, counter, resume="auto"):
    from distrain.checkpoint import Checkpointer
    from distrain.cluster import ClusterEnv
    from distrain.config import load_config, to_dict
    from distrain.dist import Collectives

    cfg = load_config(str(CONFIGS / "digits_mlp.yaml"), [f"run.dir={run_dir}", f"checkpoint.resume={resume}",
                                                         "checkpoint.keep_last=2"])
    checkpointer = Checkpointer(cfg.checkpoint, cfg.run_dir, ClusterEnv(), "full", to_dict(cfg))
    checkpointer.track(Collectives(torch.device("cpu")), files, counter=counter)
    return checkpointer


def test_checkpointer_saves_and_restores_what_it_tracks(tmp_path):
    files, counter = Files(1.0), Counter(3)
    checkpointer = _checkpointer(tmp_path, files, counter)
    assert checkpointer.maybe_resume() is None  # nothing yet
    for step in (1, 2, 3):
        files.value, counter.count = step * 10.0, step * 100
        checkpointer.save(step)
    committed = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert committed == ["step_00000002", "step_00000003"]  # keep_last=2
    assert checkpointer.latest_path().endswith("step_00000003")
    files2, counter2 = Files(0.0), Counter(0)
    path = _checkpointer(tmp_path, files2, counter2).maybe_resume()
    assert path.name == "step_00000003" and (files2.value, counter2.count) == (30.0, 300)
    older, counter3 = Files(0.0), Counter(0)
    _checkpointer(tmp_path, older, counter3, resume=str(tmp_path / "checkpoints" / "step_00000002")).maybe_resume()
    assert (older.value, counter3.count) == (20.0, 200)
