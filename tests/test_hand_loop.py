"""distrain's single-process step against the loop a user writes by hand (zero_grad, forward,
F.cross_entropy, backward, torch's default AdamW step): the same weights bit for bit, the epoch's
short last batch included, through the plain-mean step (objectives.StepScale.plain_mean)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import CONFIGS, final_weights, train_inprocess
from distrain.data.datasets import digits
from distrain.data.sampler import epoch_permutation
from distrain.models.vision import mlp
from distrain.objectives import TaskLoss

STEPS, BATCH, LR, SEED = 30, 64, 1e-3, 0  # 1,437 training samples: step 23 holds the epoch's last 29


def hand_written() -> dict:
    torch.manual_seed(SEED)
    model = mlp((1, 8, 8), 10, [32, 32])
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    x, y = digits()[0].tensors
    epoch, pos, perm = 0, 0, epoch_permutation(len(x), SEED, 0)
    for _ in range(STEPS):
        if pos >= len(x):
            epoch, pos = epoch + 1, 0
            perm = epoch_permutation(len(x), SEED, epoch)
        idx = perm[pos : pos + BATCH]
        pos += len(idx)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.state_dict()


def test_single_process_weights_are_the_hand_written_loops(tmp_path, monkeypatch):
    calls = []
    mean = TaskLoss.mean
    monkeypatch.setattr(TaskLoss, "mean", lambda self, *a: (calls.append(1), mean(self, *a))[1])
    code = train_inprocess(["--config", CONFIGS / "digits_mlp.yaml", f"run.dir={tmp_path / 'run'}",
                            "model.hidden=[32,32]", "strategy.name=single", f"run.seed={SEED}", f"optim.lr={LR}",
                            "sched.name=constant", "sched.warmup_steps=0", "train.epochs=null",
                            f"train.max_steps={STEPS}", "train.eval_every=0", "checkpoint.every_steps=0",
                            f"data.global_batch_size={BATCH}", "log.progress=off"])
    assert code == 0 and len(calls) == STEPS  # every step took the plain mean
    ours, theirs = final_weights(tmp_path / "run"), hand_written()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
