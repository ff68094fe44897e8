"""YAML values into typed dataclass fields: coercion to each field's type, and the one-line
error that names the key (the CLI turns ConfigError into exit code 2)."""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(Exception):
    """A user mistake in the config or the command line (exit code 2)."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"config key '{key}': {problem}" if key else problem)


def apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("", f"override '{item}' must look like section.key=value")
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(key, f"'{part}' is not a section")
        node = child
    node[parts[-1]] = value


def build_section(section: str, cls, values: dict, open_sections: set):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - {"args"}
    kwargs, extra = {}, {}
    for key, value in values.items():
        full = f"{section}.{key}"
        if key in known:
            kwargs[key] = coerce(full, value, hints[key])
        elif section in open_sections and key != "args":
            extra[key] = value
        else:
            raise ConfigError(full, f"unknown key{suggest(key, known)}")
    if section in open_sections:
        kwargs["args"] = {**values.get("args", {}), **extra} if isinstance(values.get("args"), dict) else extra
    return cls(**kwargs)


def coerce(key: str, value: Any, hint):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return coerce(key, value, inner)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool) and {"on", "off"} <= set(allowed):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(map(str, allowed))} (got {value!r}){suggest(str(value), allowed)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false (got {value!r})")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number (got {value!r})")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"must be a string (got {value!r})")
        return str(value)
    if hint in (list, dict):
        if not isinstance(value, hint):
            raise ConfigError(key, f"must be a {hint.__name__} (got {value!r})")
        return value
    raise TypeError(f"unsupported config type {hint} for {key}")


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
