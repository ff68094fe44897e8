"""Resolving user-supplied builders given as "pkg.module:function"."""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Callable

from .config import ConfigError


def resolve(key: str, name: str, registry: dict[str, Callable]) -> Callable:
    if name in registry:
        return registry[name]
    if ":" not in name:
        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(key, f"unknown name '{name}' (choose from {', '.join(registry)} or give pkg.module:function){hint}")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(key, f"cannot import module '{module_name}': {e}")
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(key, f"module '{module_name}' has no callable '{attr}'")
    return fn


def call_with(key_prefix: str, fn: Callable, user_args: dict, defaults: dict):
    """Call a builder with the user's arguments, plus the defaults it accepts; unknown user arguments are errors."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in user_args:
        if key not in params and not takes_any:
            close = difflib.get_close_matches(key, list(params), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key_prefix}.{key}", f"unknown argument{hint}")
    kwargs = {k: v for k, v in defaults.items() if k in params or takes_any}
    kwargs.update(user_args)
    missing = [n for n, p in params.items()
               if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
    if missing:
        raise ConfigError(f"{key_prefix}.{missing[0]}", "is required")
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(key_prefix, f"{fn.__name__}: {e}")
