"""`model.lora: {r, alpha, dropout, target_modules}`: LoRA adapters through peft, around the
built model. Only the adapters train; the base stays frozen. peft is imported here only,
when a config asks for LoRA.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ConfigError

KEY = "model.lora"
ARGUMENTS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}


def import_peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(KEY, "LoRA needs peft: pip install 'distrain[hf]' (or pip install peft)")
    return peft


def apply_lora(module: nn.Module, spec: dict) -> nn.Module:
    """The module wrapped by peft with LoRA adapters on the named modules (names as peft takes
    them: a module's last name component, e.g. q_proj, or "all-linear")."""
    if not isinstance(spec, dict):
        raise ConfigError(KEY, f"must be a mapping with r, alpha, dropout, target_modules (got {spec!r})")
    unknown = sorted(set(spec) - set(ARGUMENTS))
    if unknown:
        raise ConfigError(f"{KEY}.{unknown[0]}", f"unknown key (choose from {', '.join(ARGUMENTS)})")
    if "target_modules" not in spec:
        raise ConfigError(f"{KEY}.target_modules", "is required (e.g. [q_proj, v_proj] or all-linear)")
    targets = spec["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    if not isinstance(targets, (list, str)):
        raise ConfigError(f"{KEY}.target_modules", f"must be a list of module names or all-linear (got {targets!r})")
    if isinstance(targets, list):
        _check_targets(module, targets)
    peft = import_peft()
    kwargs = {ARGUMENTS[k]: v for k, v in spec.items() if k != "target_modules"}
    try:
        config = peft.LoraConfig(target_modules=targets, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(KEY, str(e).splitlines()[0])
    model = wrap(module, config)
    init_adapters(model)
    return model


def init_adapters(model: nn.Module) -> None:
    """peft's own initialisation of the adapters, run again from the run's seed: they then start
    the same whether the base was built with random weights (which draw from the generator first)
    or with none (parameters on the meta device, where peft puts the adapters too: they are
    allocated here, the only parameters of the model that no file fills)."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(torch.initial_seed())
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            container = getattr(layer, name)
            if any(p.is_meta for p in container.parameters()):
                container.to_empty(device="cpu")
        for adapter in dict.fromkeys([*layer.lora_A, *layer.lora_embedding_A]):
            layer.reset_lora_parameters(adapter, model.peft_config[adapter].init_lora_weights)


def wrap(module: nn.Module, config) -> nn.Module:
    """peft.get_peft_model, without the deprecation warning peft's own call into transformers
    raises (nothing a user can act on)."""
    import warnings

    peft = import_peft()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return peft.get_peft_model(module, config)


def _check_targets(module: nn.Module, targets: list) -> None:
    names = [name for name, _ in module.named_modules() if name]
    leaves = sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)})
    for target in targets:
        if not any(name == target or name.endswith("." + str(target)) for name in names):
            raise ConfigError(f"{KEY}.target_modules", f"{type(module).__name__} has no module named {target!r} "
                                                       f"(its linear layers: {', '.join(leaves) or 'none'})")


def is_peft_model(module: nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")

