"""`model.name: hf`: Hugging Face models through transformers' Auto classes, from a local
directory (`model.path`: a config.json, with or without weights) or from inline config keys
(`model.config: {model_type: llama, hidden_size: 64, ...}`). Never from the hub: files are
read with local_files_only. transformers is imported here only, when a config asks for it.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import ConfigError
from .empty import building_on_meta

AUTO_CLASS_BY_TASK = {"lm": "AutoModelForCausalLM", "classification": "AutoModelForSequenceClassification",
                      "regression": "AutoModelForSequenceClassification"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def hf(path: str | None = None, config: dict | None = None, auto_class: str | None = None, task: str | None = None,
       num_classes: int | None = None, vocab_size: int | None = None, attn_implementation: str | None = None,
       activation_checkpointing: bool = False) -> nn.Module:
    transformers = import_transformers()
    hf_config = _load_config(transformers, path, config)
    _fit_to_data(hf_config, set(config or ()), task, num_classes, vocab_size, inline=path is None)
    hf_config.use_cache = False  # training: a key/value cache is memory spent on nothing
    auto = _auto_class(transformers, auto_class, task)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        # on the meta device, the weights come from the sharded load (weights.init_source names them)
        if has_weights(path) and not building_on_meta():
            model = auto.from_pretrained(path, config=hf_config, local_files_only=True, **kwargs)
        else:
            model = auto.from_config(hf_config, **kwargs)
    except ValueError as e:  # a config the Auto class has no model for
        raise ConfigError("model.auto_class", f"{auto.__name__} cannot build a '{hf_config.model_type}' model: "
                                              f"{str(e).splitlines()[0]}")
    model.float()  # fp32 master weights whatever dtype the files hold; bf16 is train.precision's job
    model.train()  # from_pretrained hands models over in eval mode, which would train without dropout
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def has_weights(path: str | None) -> bool:
    return path is not None and any((Path(path) / f).is_file() for f in WEIGHT_FILES)


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.name", "model.name=hf needs transformers: pip install 'distrain[hf]'")
    return transformers


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward, through the model's own switch (non-reentrant, which
    works with DDP, FSDP2 and unused inputs)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError("train.activation_checkpointing", f"{type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _load_config(transformers, path: str | None, config: dict | None):
    if path is None and config is None:
        raise ConfigError("model.path", "model.name=hf needs model.path (a directory with config.json) "
                                        "or model.config (a mapping with model_type)")
    if config is not None and not isinstance(config, dict):
        raise ConfigError("model.config", f"must be a mapping of config keys (got {config!r})")
    if path is not None:
        if not (Path(path) / "config.json").is_file():
            raise ConfigError("model.path", f"{path} holds no config.json")
        loaded = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        for key, value in (config or {}).items():  # inline keys override the file's
            setattr(loaded, key, value)
        return loaded
    rest = dict(config)
    model_type = rest.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.config.model_type", "is required (e.g. llama, gpt2, bert)")
    try:
        return transformers.AutoConfig.for_model(model_type, **rest)
    except ValueError as e:
        raise ConfigError("model.config.model_type", str(e).splitlines()[0])


def _fit_to_data(hf_config, user_keys: set, task: str | None, num_classes: int | None, vocab_size: int | None,
                 inline: bool) -> None:
    """The data's facts, where the user's keys leave them open: classes for a classifier head,
    the vocabulary of a token corpus."""
    if task == "classification" and num_classes and not user_keys & {"num_labels", "id2label"}:
        hf_config.num_labels = num_classes
    if task == "regression" and "num_labels" not in user_keys:
        hf_config.num_labels, hf_config.problem_type = 1, "regression"
    if task == "lm" and vocab_size:
        if inline and "vocab_size" not in user_keys:
            hf_config.vocab_size = vocab_size
        elif getattr(hf_config, "vocab_size", vocab_size) < vocab_size:
            raise ConfigError("model.config.vocab_size", f"{hf_config.vocab_size} is smaller than the data's "
                                                         f"vocabulary ({vocab_size} tokens)")


def _auto_class(transformers, name: str | None, task: str | None):
    if name is None:
        if task not in AUTO_CLASS_BY_TASK:
            raise ConfigError("model.auto_class", f"name the Auto class for data task {task!r} "
                                                  "(e.g. AutoModelForCausalLM)")
        name = AUTO_CLASS_BY_TASK[task]
    auto = getattr(transformers, name, None) if name.startswith("AutoModel") else None
    if auto is None:
        raise ConfigError("model.auto_class", f"'{name}' is not one of transformers' AutoModel classes "
                                              "(e.g. AutoModelForCausalLM, AutoModelForSequenceClassification)")
    return auto
