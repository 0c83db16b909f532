"""Configs are data: a config file's `get_config()` returns an `ml_collections.ConfigDict`.

Every field can be overridden on the command line as `key.path=value` (or
`--config.key.path=value`, the big_vision spelling). Values are parsed as Python literals and
must keep the field's type; an unknown key or a value of the wrong type is a `ConfigError` whose
one-line message names the valid keys or the expected type.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Iterable

import ml_collections


class ConfigError(ValueError):
    """A bad config file, key or value. Its message is one line, for the user."""


def load(path: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Loads `get_config()` from a Python file, then applies `key=value` overrides."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_dalle_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # A user's file: report it, do not dump a traceback.
        raise ConfigError(f"could not load config {path}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {path} has no get_config() function")
    config = module.get_config()
    return apply_overrides(config, overrides)


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            keys += flat_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # A bare word is a string: `model.variant=tiny`.


def _coerce(key: str, old, new):
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
        raise ConfigError(f"{key} must be a bool (True/False), got {new!r}")
    if isinstance(old, float) and isinstance(new, int):
        return float(new)
    if isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)):
        return type(old)(new)
    if not isinstance(new, type(old)):
        raise ConfigError(f"{key} must be {type(old).__name__}, got {new!r} "
                          f"({type(new).__name__})")
    return new


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]):
    config = ml_collections.ConfigDict(config)  # a copy; the caller's stays as it was
    valid = flat_keys(config)
    for item in overrides:
        item = item[len("--config."):] if item.startswith("--config.") else item.lstrip("-")
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; valid keys: "
                              + ", ".join(valid))
        key, text = item.split("=", 1)
        if key not in valid:
            raise ConfigError(f"unknown config key {key!r}; valid keys: " + ", ".join(valid))
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        with node.unlocked():
            node[leaf] = _coerce(key, node[leaf], _parse_value(text))
    return config
