"""distrain.objectives: every loss source as (sum, count), and the exactness rule: the
gradient of a step split over ranks and micro-batches is that of the global mean."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from distrain.config import ConfigError
from distrain.data.batch import call_model, collate
from distrain.data.sampler import StepBatch
from distrain.objectives import ModelLoss, StepScale, TaskLoss, build_objective, items_per_sample, summarize
from tests.hf_tiny import LLAMA, masked_samples

torch.set_num_threads(1)


def tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**LLAMA))


def test_tuple_batches_count_samples_tokens_and_target_elements():
    torch.manual_seed(0)
    out, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    loss_sum, count = TaskLoss("classification", "M").loss(out, (None, y))
    assert count.item() == 6 and torch.allclose(loss_sum / 6, F.cross_entropy(out, y))
    logits, targets = torch.randn(3, 5, 7), torch.randint(0, 7, (3, 5))
    loss_sum, count = TaskLoss("lm", "M").loss(logits, (None, targets))  # tuple targets come shifted
    assert count.item() == 15
    assert torch.allclose(loss_sum / 15, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    targets[0, :3] = -100  # a document boundary a token corpus masks
    lm = TaskLoss("lm", "M")
    assert lm.count((None, targets)).item() == 12 == lm.loss(logits, (None, targets))[1]
    pred, target = torch.randn(4, 2), torch.randn(4, 2)
    loss_sum, count = TaskLoss("regression", "M").loss(pred, (None, target))
    assert count.item() == 8 and torch.allclose(loss_sum / 8, F.mse_loss(pred, target))


def test_dict_lm_batches_shift_and_ignore_like_hugging_face():
    model = tiny_llama()
    batch = collate(masked_samples(4, 12, seed=1))
    out = call_model(model, batch)
    loss_sum, count = TaskLoss("lm", "LlamaForCausalLM").loss(out, batch)
    assert count.item() == (batch["labels"][:, 1:] != -100).sum().item()
    assert torch.allclose(loss_sum / count, out.loss, atol=1e-6)  # the model's own mean, the same items
    model_sum, model_count = ModelLoss("lm", model).loss(out, batch)
    assert model_count.item() == count.item() and torch.allclose(model_sum, loss_sum, atol=1e-4)


def test_dict_classification_ignores_minus_100_and_counts_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    batch = {"input_ids": torch.zeros(3, 2), "labels": torch.tensor([0, 0, -100])}
    loss_sum, correct, count = TaskLoss("classification", "M").eval_sums({"logits": logits}, batch)
    assert count.item() == 2 and correct.item() == 1
    assert TaskLoss("classification", "M").count(batch).item() == 2  # no causal shift outside lm
    assert torch.allclose(loss_sum, F.cross_entropy(logits[:2], batch["labels"][:2], reduction="sum"))
    result = summarize(loss_sum.item(), correct.item(), count.item(), 3, TaskLoss("classification", "M"))
    assert result["accuracy"] == 0.5 and result["items"] == 2 and result["samples"] == 3 and "perplexity" not in result


def test_language_models_report_perplexity():
    result = summarize(6.0, 1.0, 3, 2, TaskLoss("lm", "M"))
    assert result["loss"] == 2.0 and math.isclose(result["perplexity"], math.exp(2.0))


def test_model_loss_with_nothing_counted_adds_nothing_instead_of_nan():
    model = tiny_llama()
    batch = collate(masked_samples(2, 8, seed=2))
    batch["labels"][:] = -100
    out = call_model(model, batch)
    loss_sum, count = ModelLoss("lm", model).loss(out, batch)
    assert count.item() == 0 and loss_sum.item() == 0.0
    loss_sum.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("output,source,match", [
    ({"hidden": torch.zeros(1)}, "task", "M returned a dict with keys hidden with no 'logits'"),
    (torch.zeros(2, 3), "model", "train.loss=model but M returned a Tensor with no 'loss'"),
    ({"logits": torch.zeros(2, 3)}, "model", "returned a dict with keys logits with no 'loss'")])
def test_outputs_without_what_the_loss_needs_name_the_model(output, source, match):
    class M(nn.Module):
        pass

    objective = build_objective(source, "classification", M())
    with pytest.raises(ConfigError, match=match) as e:
        objective.loss(output, {"input_ids": torch.zeros(2), "labels": torch.zeros(2, dtype=torch.long)})
    assert e.value.key == "train.loss"


def test_a_user_function_must_return_a_sum_and_a_count():
    objective = build_objective("tests.test_objectives:returns_a_mean", "lm", nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="must return \\(loss_sum, count\\).*got a Tensor"):
        objective.loss(None, None)
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.losses'"):
        build_objective("no_such_pkg.losses:fn", "lm", nn.Linear(1, 1))


def returns_a_mean(output, batch):
    return torch.tensor(1.0)


def split_gradients(model, objective, batch, ranks: int, micro: int, naive: bool = False) -> list[torch.Tensor]:
    """The gradient DDP with accumulation would apply: each simulated rank back-propagates its
    micro-batches, the ranks' gradients are averaged. Rows are cut contiguously, as the sampler does."""
    rows = batch["input_ids"].shape[0]
    per_rank, per_micro = rows // ranks, rows // ranks // micro
    shards = [[{k: v[r * per_rank + m * per_micro : r * per_rank + (m + 1) * per_micro] for k, v in batch.items()}
               for m in range(micro)] for r in range(ranks)]
    if objective.counts_before_forward and not naive:  # counted before the forward, one all-reduce
        scale = ranks / sum(objective.count(mb) for shard in shards for mb in shard)
    total = [torch.zeros_like(p) for p in model.parameters()]
    counts = 0
    for shard in shards:
        model.zero_grad()
        for mb in shard:
            loss_sum, count = objective.loss(call_model(model, mb), mb)
            counts += count
            if naive:  # a per-micro-batch mean, averaged over micro-batches: what accumulation loops do
                (loss_sum / count / micro).backward()
            elif objective.counts_before_forward:
                (loss_sum * scale).backward()
            else:
                (loss_sum * ranks / rows).backward()
        for t, p in zip(total, model.parameters()):
            t += p.grad / ranks  # the ranks' average, as DDP's all-reduce makes it
    if not objective.counts_before_forward and not naive:
        total = [t * rows / counts for t in total]
    return total


@pytest.mark.parametrize("source", ["task", "model", "examples.userpkg.losses:token_cross_entropy"])
def test_split_steps_give_the_gradient_of_the_global_mean(source):
    model = tiny_llama()
    batch = collate(masked_samples(8, 12, seed=3))
    objective = build_objective(source, "lm", model)
    model.zero_grad()
    loss_sum, count = objective.loss(call_model(model, batch), batch)
    (loss_sum / count).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    split = split_gradients(model, objective, batch, ranks=2, micro=2)
    assert max((a - b).abs().max().item() for a, b in zip(split, reference)) < 1e-6
    naive = split_gradients(model, objective, batch, ranks=2, micro=2, naive=True)
    assert max((a - b).abs().max().item() for a, b in zip(naive, reference)) > 1e-3


class TwinRanks:
    """All-reduce as if a second rank held the same numbers."""
    device = torch.device("cpu")

    def all_reduce_sum(self, t):
        return t.mul_(2)


def test_step_scale_counts_before_the_forward_or_rescales_after():
    micro = [collate(masked_samples(2, 12, seed=6)), collate(masked_samples(2, 12, seed=7))]
    step = StepBatch(micro_batches=[None, None], real=[2, 2], global_size=8)
    task = TaskLoss("lm", "M")
    tokens = sum(int(task.count(mb)) for mb in micro)
    scale = StepScale(task, TwinRanks(), world_size=2)
    assert float(scale.before(step, micro)) == 2 / (2 * tokens) and scale.after(step, [tokens]) is None
    fn = build_objective("examples.userpkg.losses:token_cross_entropy", "lm", nn.Linear(1, 1))
    scale = StepScale(fn, TwinRanks(), world_size=2)
    assert scale.before(step, micro) == 2 / 8 and scale.after(step, [tokens]) == 8 / (2 * tokens)
    step.real = [2, 0]  # a stand-in micro-batch counts nothing
    assert float(StepScale(task, TwinRanks(), 2).before(step, micro)) == 2 / (2 * int(task.count(micro[0])))


def test_in_memory_sets_without_ignored_labels_need_no_count_all_reduce():
    from torch.utils.data import TensorDataset

    task = TaskLoss("lm", "M")
    tokens = TensorDataset(torch.zeros(4, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long))
    assert items_per_sample(tokens, task) == 5
    assert StepScale(task, None, 2, items_per_sample=5).before(StepBatch([], [4], 8), []) == 2 / 40
    tokens.tensors[1][0, 0] = -100
    assert items_per_sample(tokens, task) is None
    classes = TensorDataset(torch.zeros(4, 3), torch.tensor([0, 1, 2, 1]))
    assert items_per_sample(classes, task) == 1 and items_per_sample(classes, ModelLoss("lm", nn.Linear(1, 1))) is None


def test_an_unknown_loss_source_is_a_config_mistake():
    from distrain.config import load_config

    with pytest.raises(ConfigError, match="must be task, model or pkg.module:fn .*did you mean 'model'") as e:
        load_config(None, ["train.max_steps=1", "train.loss=modle"])
    assert e.value.key == "train.loss"


def test_the_plain_mean_is_the_step_gradient_where_a_rank_holds_its_even_share():
    """StepScale.plain_mean: one micro-batch, 1/world_size of the step, a static item count. There
    TaskLoss.mean is the hand-written loop's loss bit for bit, and its gradient is the (sum, count)
    path's; anywhere else the plain mean is not used."""
    task = TaskLoss("classification", "M")
    scale = StepScale(task, None, 2, items_per_sample=1)
    assert scale.plain_mean(StepBatch([None], [32], 64))
    assert not scale.plain_mean(StepBatch([None], [15], 29))  # the epoch's tail, split 15 + 14
    assert not scale.plain_mean(StepBatch([None, None], [16, 16], 64))  # accumulation: the sum path
    assert not StepScale(task, None, 2).plain_mean(StepBatch([None], [32], 64))  # counts known only from labels
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    for task_name, rows, y in [("classification", 29, torch.randint(0, 4, (29,))),
                               ("regression", 6, torch.randn(6, 4)), ("lm", 3, torch.randint(0, 4, (3, 7)))]:
        x = torch.randn(rows, 7, 5) if task_name == "lm" else torch.randn(rows, 5)
        objective, items = TaskLoss(task_name, "M"), y[0].numel()
        mean = objective.mean(model(x), (x, y))
        if task_name == "classification":
            assert torch.equal(mean, F.cross_entropy(model(x), y))
        grads = []
        for loss in (mean, objective.loss(model(x), (x, y))[0] * StepScale(objective, None, 1, items).before(
                StepBatch([None], [rows], rows), [])):
            model.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-8) for a, b in zip(*grads)), task_name
