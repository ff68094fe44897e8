"""The one place that knows what a batch looks like.

A sample, and so a batch, is either a tuple `(input, target)` or a dict of tensors in the
Hugging Face shape (`input_ids`, `attention_mask`, `labels`, `pixel_values`, ...). Dict
batches call `model(**batch)` and take their target from `labels`; tuples call
`model(input)`. Label value IGNORE_INDEX marks an item that does not count (padding, prompt
tokens), as in torch's cross-entropy and Hugging Face's losses.
"""
from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import default_collate

from ..config import ConfigError

IGNORE_INDEX = -100
LABELS = "labels"


def is_dict(batch) -> bool:
    return isinstance(batch, Mapping)


def to_device(batch, device: torch.device):
    """Every tensor of the batch on the device; other values (strings, ids, None) stay as they are."""
    non_blocking = device.type != "cpu"  # lets a pinned host batch copy while the GPU still computes
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=non_blocking)
    if is_dict(batch):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# Hugging Face heads whose forward uses `labels` only to compute a loss: under the task's loss,
# which reads them from the batch, the model is called without them (not a second loss per step)
LOSS_ONLY_LABELS = ("ForCausalLM", "ForSequenceClassification", "ForTokenClassification", "ForMaskedLM",
                    "ForImageClassification")


def labels_only_for_loss(module: nn.Module) -> bool:
    return hasattr(module, "loss_function") and model_class_name(module).endswith(LOSS_ONLY_LABELS)


def call_model(model: nn.Module, batch, without_labels: bool = False):
    if is_dict(batch):
        if without_labels and LABELS in batch:
            batch = {k: v for k, v in batch.items() if k != LABELS}
        return model(**batch)
    return model(batch[0])


def target(batch):
    """The labels of a dict batch (None without them), the second element of a tuple."""
    if is_dict(batch):
        return batch.get(LABELS)
    return batch[1] if len(batch) > 1 else None


def num_samples(batch) -> int:
    first = next(iter(batch.values())) if is_dict(batch) else batch[0]
    return len(first)


def count_items(batch, shifted: bool) -> torch.Tensor:
    """Items the loss counts, known before the forward pass. Integer labels (classes, tokens):
    those other than IGNORE_INDEX, from the second position on when `shifted` (a causal LM
    predicts token t+1 at t, so a row's first label has no prediction). Float targets: every
    element. No target: the samples."""
    labels = target(batch)
    if labels is None or not torch.is_tensor(labels):
        return torch.tensor(num_samples(batch), dtype=torch.int64)
    if labels.is_floating_point():
        return torch.tensor(labels.numel(), dtype=torch.int64)
    if shifted:
        labels = labels[..., 1:]
    return (labels != IGNORE_INDEX).sum()  # on the labels' device: nothing waits for it


def collate_fn(meta: dict) -> Callable:
    """The data builder's meta["collate"] if it gave one (a padding collator, say), else torch's
    default, which stacks tuples and dicts of equal-shaped tensors."""
    collate = meta.get("collate")
    if collate is None:
        return default_collate
    if not callable(collate):
        raise ConfigError("data.name", f"meta['collate'] must be a callable turning a list of samples into a "
                                       f"batch (got {type(collate).__name__})")
    return collate


def collate(samples: list, fn: Callable = default_collate):
    """A batch from a list of samples, checked to be usable."""
    return check_batch_shape(fn(samples))


def check_batch_shape(batch):
    """A batch must be an (input, target, ...) tuple or a dict holding at least one tensor."""
    if is_dict(batch):
        if not any(torch.is_tensor(v) for v in batch.values()):
            raise ConfigError("data.name", f"a dict batch must hold tensors (got keys {sorted(map(str, batch))} "
                                           "and no tensor among the values)")
        return batch
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return batch
    raise ConfigError("data.name", "a batch must be an (input, target) tuple or a dict of tensors "
                                   f"(collate gave {_describe(batch)})")


def check_batch(module: nn.Module, batch) -> None:
    """Before the first step: a dict batch's keys must be arguments of the model's forward."""
    check_batch_shape(batch)
    if not is_dict(batch):
        return
    accepted = forward_arguments(module)
    if accepted is None:
        return
    for key in batch:
        if key not in accepted:
            shown = ", ".join(sorted(accepted))
            raise ConfigError("data.name", f"batch key '{key}' is not an argument of "
                                           f"{model_class_name(module)}.forward (it takes {shown})")


def model_class_name(module: nn.Module) -> str:
    """The user's model class, also under FSDP2, which swaps in a subclass named FSDP<name>."""
    cls = type(module)
    if cls.__name__.startswith("FSDP") and len(cls.__mro__) > 1 and cls.__mro__[1].__name__ == cls.__name__[4:]:
        cls = cls.__mro__[1]
    return cls.__name__


def forward_arguments(module: nn.Module) -> set[str] | None:
    """The keyword arguments forward accepts; None when it takes any (**kwargs without a
    declared set of keys). Hugging Face models declare theirs as **kwargs: Unpack[TypedDict]."""
    params = inspect.signature(module.forward).parameters
    names = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for p in params.values():
        if p.kind is p.VAR_KEYWORD:
            declared = _typed_dict_keys(p.annotation)
            if declared is None:
                return None
            names |= declared
    return names


def _typed_dict_keys(annotation: Any) -> set[str] | None:
    if getattr(typing.get_origin(annotation), "_name", None) != "Unpack" and \
            type(annotation).__name__ != "_UnpackGenericAlias":
        return None
    (inner,) = typing.get_args(annotation) or (None,)
    keys = getattr(inner, "__annotations__", None)
    return set(keys) if isinstance(keys, dict) and hasattr(inner, "__total__") else None


def _describe(value) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {', '.join(type(v).__name__ for v in value[:4]) or 'nothing'}"
    return f"a {type(value).__name__}"
