"""Loss sources behind one interface: every one gives, for a micro-batch, a (loss_sum, count)
pair of tensors: the loss summed over the items it counts, and how many there are.

Sources (`train.loss`):
- `task` (the default): the data's task from logits and targets (a tuple's second element,
  a dict's `labels`). Classification and `lm` count the labels other than -100 (samples,
  tokens), regression every target element. Tuple `lm` targets come shifted already; dict
  batches follow the Hugging Face convention (labels aligned with the inputs, shifted
  inside the loss).
- `model`: the loss the model returns. Hugging Face models return the MEAN over the labels
  they count, so loss_sum = mean * count, with the count taken from the batch's labels the
  way their loss functions count (shifted for causal LMs, transformers' ForCausalLMLoss).
- `pkg.module:fn`: a user function `fn(output, batch) -> (loss_sum, count)`.

Exactness: a step's gradient is the gradient of (sum of loss_sum over the global batch) /
(global count of items), however the batch is split over ranks and micro-batches. Two paths:
- Count before the forward (`counts_before_forward`: `task` and `model`): the counts come
  from the batch's labels, so the trainer loads every micro-batch of a step first, adds
  their counts, all-reduces that one number over ranks, and back-propagates each
  micro-batch's loss_sum * world_size / global_count (strategies average gradients over
  ranks, hence the world_size). Nothing is rescaled afterwards; clipping and the gradient
  norm see the final gradient. In-memory tuple sets whose targets hold no -100 count the
  same items per sample: there the count is known from the sample count, no all-reduce,
  and where a rank's one micro-batch is exactly its even share of the step, the plain
  `reduction="mean"` loss is already that gradient (`StepScale.plain_mean`).
- Count from the output (a user function): each micro-batch back-propagates
  loss_sum * world_size / global_batch_samples (a rank-independent scale that keeps the
  magnitudes those of a mean), the counts are all-reduced after the last backward, and the
  strategy multiplies the gradients by global_batch_samples / global_count before clipping
  and the optimizer step (Strategy.step's grad_scale).
`StepScale` gives the trainer both factors.

Evaluation uses the same sources through `eval_sums`: loss sum, correct predictions where
accuracy has a meaning, and the count, reduced as sums over ranks; `summarize` turns them
into the mean loss, accuracy and, for language models, perplexity = exp(mean loss).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .config import ConfigError
from .data.batch import IGNORE_INDEX, count_items, is_dict, labels_only_for_loss, model_class_name, target

TASKS = ("classification", "regression", "lm")


def logits_of(output, model_name: str) -> torch.Tensor:
    if torch.is_tensor(output):
        return output
    value = _field(output, "logits")
    if value is None:
        raise ConfigError("train.loss", f"{model_name} returned {_describe(output)} with no 'logits' to compute "
                                        "the task's loss from (set train.loss=model to use the loss it returns)")
    return value


def loss_of(output, model_name: str) -> torch.Tensor:
    value = None if torch.is_tensor(output) else _field(output, "loss")
    if value is None:
        raise ConfigError("train.loss", f"train.loss=model but {model_name} returned {_describe(output)} with no "
                                        "'loss' (give the batch 'labels', or use train.loss=task)")
    return value


class TaskLoss:
    """The built-in tasks' losses from logits and targets."""

    counts_before_forward = True

    def __init__(self, task: str, model_name: str, without_labels: bool = False):
        if task not in TASKS:
            raise ConfigError("data.task", f"unknown task {task!r} (choose from {', '.join(TASKS)})")
        self.task, self.model_name, self.without_labels = task, model_name, without_labels
        self.has_accuracy = task in ("classification", "lm")

    def count(self, batch) -> torch.Tensor:
        return count_items(batch, shifted=self.shifted(batch))

    def shifted(self, batch) -> bool:
        """Language modelling on dict batches follows Hugging Face: labels aligned with the inputs,
        shifted here. Tuple targets come shifted already, (x, y) windows of a token stream."""
        return self.task == "lm" and is_dict(batch)

    def loss(self, output, batch) -> tuple[torch.Tensor, torch.Tensor]:
        loss_sum, _, count = self.eval_sums(output, batch, want_correct=False)
        return loss_sum, count

    def mean(self, output, batch) -> torch.Tensor:
        """The plain mean over the micro-batch's items (`reduction="mean"`): a step's gradient
        where StepScale.plain_mean says so."""
        return self._reduce(*self._pair(output, batch), "mean")

    def eval_sums(self, output, batch, want_correct: bool = True):
        pred, y = self._pair(output, batch)
        loss_sum = self._reduce(pred, y, "sum")
        if self.task == "regression":
            return loss_sum, None, torch.tensor(y.numel(), device=loss_sum.device)
        counted = y != IGNORE_INDEX
        correct = ((pred.argmax(-1) == y) & counted).sum() if want_correct else None
        return loss_sum, correct, counted.sum()

    def _pair(self, output, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(predictions, targets) in the shapes and dtypes the task's loss takes."""
        logits, y = logits_of(output, self.model_name), target(batch)
        if y is None:
            raise ConfigError("data.name", f"the {self.task} task needs targets: a dict batch needs 'labels' "
                                           f"(got keys {', '.join(batch)})")
        if self.task == "regression":
            return logits.float().reshape(y.shape), y.float()
        if self.shifted(batch):  # position t predicts label t+1
            logits, y = logits[..., :-1, :], y[..., 1:]
        return logits.flatten(0, -2).float(), y.flatten()

    def _reduce(self, pred, y, reduction: str) -> torch.Tensor:
        if self.task == "regression":
            return F.mse_loss(pred, y, reduction=reduction)
        return F.cross_entropy(pred, y, ignore_index=IGNORE_INDEX, reduction=reduction)


class ModelLoss:
    """The model's own loss, the mean over the labels it counts (Hugging Face's convention)."""

    counts_before_forward = True
    without_labels = False

    def __init__(self, task: str, module: nn.Module):
        self.task, self.model_name = task, model_class_name(module)
        self.causal = is_causal_lm(module, task)
        self.has_accuracy = task in ("classification", "lm")

    def count(self, batch) -> torch.Tensor:
        return count_items(batch, shifted=self.causal)

    def loss(self, output, batch) -> tuple[torch.Tensor, torch.Tensor]:
        mean = loss_of(output, self.model_name)
        count = self.count(batch).to(mean.device)
        # a micro-batch with nothing counted has a NaN mean (0/0) and adds nothing
        return torch.where(count > 0, mean.float() * count, torch.zeros((), device=mean.device)), count

    def eval_sums(self, output, batch):
        loss_sum, count = self.loss(output, batch)
        logits = None if torch.is_tensor(output) else _field(output, "logits")
        correct = None
        if self.has_accuracy and logits is not None and target(batch) is not None:
            correct = TaskLoss(self.task, self.model_name).eval_sums(logits, batch)[1]
        return loss_sum, correct, count


class FunctionLoss:
    """A user's `fn(output, batch) -> (loss_sum, count)`; the count is known only from its result."""

    counts_before_forward = False
    has_accuracy = False
    without_labels = False

    def __init__(self, name: str, fn: Callable, task: str):
        self.name, self.fn, self.task = name, fn, task

    def loss(self, output, batch) -> tuple[torch.Tensor, torch.Tensor]:
        result = self.fn(output, batch)
        if not (isinstance(result, tuple) and len(result) == 2 and torch.is_tensor(result[0])
                and result[0].dim() == 0 and isinstance(result[1], (int, float, torch.Tensor))):
            raise ConfigError("train.loss", f"{self.name} must return (loss_sum, count) with loss_sum a scalar "
                                            f"tensor (got {_describe(result)})")
        loss_sum, count = result
        return loss_sum, torch.as_tensor(count, device=loss_sum.device)

    def eval_sums(self, output, batch):
        loss_sum, count = self.loss(output, batch)
        return loss_sum, None, count


def build_objective(source: str, task: str, module: nn.Module):
    """`train.loss`: task | model | pkg.module:fn."""
    if source == "task":
        return TaskLoss(task, model_class_name(module), labels_only_for_loss(module))
    if source == "model":
        return ModelLoss(task, module)
    from .imports import resolve

    return FunctionLoss(source, resolve("train.loss", source, {}), task)


def is_causal_lm(module: nn.Module, task: str) -> bool:
    """Whether the model's own loss shifts its labels: Hugging Face causal LMs do; for any other
    model, language modelling data says so."""
    if getattr(module, "config", None) is not None and hasattr(module, "loss_type"):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal_classes = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        return module.loss_type == "ForCausalLM" or model_class_name(module) in causal_classes
    return task == "lm"


class StepScale:
    """How a step's micro-batch loss sums become the gradient of the global mean (see the module
    docstring): `before` gives the factor each micro-batch's loss_sum is back-propagated with,
    `after` the factor the gradients still need (None: none)."""

    def __init__(self, objective, comm, world_size: int, items_per_sample: int | None = None):
        self.objective, self.comm, self.world_size = objective, comm, world_size
        self.items_per_sample = items_per_sample

    def plain_mean(self, step) -> bool:
        """Whether the plain mean loss of this rank's one micro-batch is the step's gradient: every
        sample counts the same items and the rank holds exactly 1/world_size of the step's samples,
        so its sum x `before`'s factor is its mean. The hand-written loop's arithmetic, without a
        count or a scale."""
        return (self.items_per_sample is not None and len(step.real) == 1
                and step.real[0] * self.world_size == step.global_size)

    def before(self, step, micro: list) -> float | torch.Tensor:
        if self.items_per_sample is not None:  # every sample counts the same: no all-reduce needed
            return self.world_size / (step.global_size * self.items_per_sample)
        if self.objective.counts_before_forward:
            counts = [self.objective.count(mb) for mb, real in zip(micro, step.real) if real]
            # a 0-dim tensor on the communication device: on a GPU nothing waits for it here
            return (self.world_size / self._global(counts).clamp(min=1.0))[0]
        return self.world_size / step.global_size

    def after(self, step, counts: list) -> float | None:
        if self.objective.counts_before_forward:
            return None
        return step.global_size / max(self._global(counts).item(), 1.0)

    def _global(self, counts: list) -> torch.Tensor:
        device = self.comm.device
        local = torch.zeros(1, dtype=torch.float64, device=device)
        for c in counts:
            local += torch.as_tensor(c).to(device, torch.float64)
        return self.comm.all_reduce_sum(local)


def items_per_sample(dataset, objective) -> int | None:
    """Items per sample when it is the same for every sample of an in-memory tuple set (no -100
    among integer targets): then a step's count is its sample count times this, known without
    an all-reduce. None otherwise."""
    from torch.utils.data import TensorDataset

    if not isinstance(objective, TaskLoss) or not isinstance(dataset, TensorDataset) or len(dataset.tensors) < 2:
        return None
    y = dataset.tensors[1]
    if not y.is_floating_point() and bool((y == IGNORE_INDEX).any()):
        return None
    return max(1, y[0].numel()) if len(y) else None


def summarize(loss_sum: float, correct: float | None, count: float, samples: int, objective) -> dict:
    mean = loss_sum / count if count else float("nan")
    out = {"loss": mean, "samples": int(samples), "items": int(count)}
    if objective.has_accuracy and correct is not None:
        out["accuracy"] = correct / count if count else float("nan")
    if objective.task == "lm":
        out["perplexity"] = math.exp(min(mean, 700.0))  # exp overflows a double past ~709
    return out


def _field(output, name: str):
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None)


def _describe(value) -> str:
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {', '.join(map(str, value.keys())) or 'none'}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}: {', '.join(type(v).__name__ for v in value)}"
    return f"a {type(value).__name__}"
