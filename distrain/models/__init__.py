"""Model registry: a plain dict of builders. User models by import path "pkg.module:fn"."""
from __future__ import annotations

import inspect

from torch import nn

from ..config import ConfigError, ModelConfig
from ..imports import call_with, resolve
from .gpt import gpt
from .vision import cnn, lenet, mlp, regression, resnet18

MODELS = {"mlp": mlp, "cnn": cnn, "lenet": lenet, "resnet18": resnet18, "regression": regression, "gpt": gpt}


def build_model(cfg: ModelConfig, data_meta: dict, activation_checkpointing: bool = False) -> nn.Module:
    """Builders get the data's shape facts (in_shape, num_classes, vocab_size, seq_len) when they ask for them."""
    builder = resolve("model.name", cfg.name, MODELS)
    if activation_checkpointing and "activation_checkpointing" not in inspect.signature(builder).parameters:
        raise ConfigError("train.activation_checkpointing", f"model '{cfg.name}' does not support it (gpt and resnet18 do)")
    defaults = {**data_meta, "activation_checkpointing": activation_checkpointing}
    return call_with("model", builder, cfg.args, defaults)
