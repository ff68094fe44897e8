"""A model's repeated blocks (transformer layers), found by class name: the units FSDP2
shards one by one. Hugging Face models name theirs in `_no_split_modules`; for any other
model the user names them."""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def block_class_names(module: nn.Module) -> set[str]:
    """The block classes a Hugging Face model declares (empty for other models)."""
    return set(getattr(module, "_no_split_modules", None) or ())


def find_blocks(module: nn.Module, class_names: Iterable[str]) -> list[nn.Module]:
    """The outermost sub-modules whose class is named, in module order, leaving out any block
    that shares a parameter with the rest of the model: a tied weight (an embedding reused as
    the output head) must stay in one unit, or the two uses would be sharded apart."""
    names = set(class_names)
    owners: dict[int, set[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), set()).add(name)
    blocks, taken = [], []
    for prefix, sub in module.named_modules():
        if sub is module or type(sub).__name__ not in names or any(prefix.startswith(t + ".") for t in taken):
            continue
        inside = prefix + "."
        tied = any(not all(n.startswith(inside) for n in owners[id(p)]) for p in sub.parameters())
        if not tied:
            blocks.append(sub)
            taken.append(prefix)
    return blocks


def unknown_class_names(module: nn.Module, class_names: Iterable[str]) -> list[str]:
    """Named classes that no sub-module has: most likely a typo in the config."""
    present = {type(m).__name__ for m in module.modules()}
    return sorted(set(class_names) - present)
