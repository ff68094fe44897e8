"""Model registry: a plain dict of builders. User models by import path "pkg.module:fn"."""
from __future__ import annotations

import contextlib
import inspect

from torch import nn

from ..config import ConfigError, ModelConfig
from ..imports import call_with, resolve
from .empty import parameters_on_meta
from .gpt import gpt
from .hf import hf
from .vision import cnn, lenet, mlp, regression, resnet18

MODELS = {"mlp": mlp, "cnn": cnn, "lenet": lenet, "resnet18": resnet18, "regression": regression, "gpt": gpt,
          "hf": hf}


# meta entries that are not shape facts: only builders that name them get them
NOT_SHAPE_FACTS = ("task", "collate")


def build_model(cfg: ModelConfig, data_meta: dict, activation_checkpointing: bool = False,
                empty: bool = False) -> nn.Module:
    """Builders get the data's shape facts (in_shape, num_classes, vocab_size, seq_len) when they ask
    for them, and the task (hf picks its Auto class by it) when they name it. empty: the builder's
    parameters are left on the meta device (models.empty), for a file to fill once sharded."""
    builder = resolve("model.name", cfg.name, MODELS)
    params = inspect.signature(builder).parameters
    if activation_checkpointing and "activation_checkpointing" not in params:
        raise ConfigError("train.activation_checkpointing", f"model '{cfg.name}' does not support it "
                                                            "(gpt, resnet18 and hf do)")
    facts = {k: v for k, v in data_meta.items() if k not in NOT_SHAPE_FACTS or k in params}
    defaults = {**facts, "activation_checkpointing": activation_checkpointing}
    with parameters_on_meta() if empty else contextlib.nullcontext():
        module = call_with("model", builder, cfg.args, defaults)
    if cfg.lora is not None:
        from ..lora import apply_lora

        module = apply_lora(module, cfg.lora)
    return module
