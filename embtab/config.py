"""Run configs from YAML or TOML files, overridden by command-line values.

A file holds a RunConfig as nested mappings (`dataset`, `features`, `model`, `tables`,
`train`); an override is a dotted key and a value (`train.epochs=2`, `model.name=din`,
`tables.overrides.user_id.method=full`), the value parsed as YAML so numbers, booleans, null and
lists keep their types. Every key and value is checked against the config dataclasses before
any data is read.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from models.config import RunConfig, run_config_from_dict

SUFFIXES = (".yaml", ".yml", ".toml")


class ConfigFileError(ValueError):
    """A config file that cannot be read or parsed, or a malformed override."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The file's contents as nested dicts (an empty file is an empty config)."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigFileError(
            f"config file {path}: unknown format {path.suffix!r}; accepted: {', '.join(SUFFIXES)}"
        )
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigFileError(f"config file {path}: {error.strerror or error}") from error
    try:
        raw = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise ConfigFileError(f"config file {path} does not parse: {error}") from error
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigFileError(
            f"config file {path} must hold a mapping (dataset, model, tables, train), "
            f"got {type(raw).__name__}"
        )
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value` -> ("key.path", parsed value)."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise ConfigFileError(f"override {text!r} is not KEY=VALUE (e.g. train.epochs=2)")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigFileError(f"override {text!r}: the value does not parse: {error}") from error


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict:
    """A copy of `raw` with each dotted key set to its value (intermediate mappings created)."""
    result = _copy(raw)
    for key, value in overrides:
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigFileError(
                    f"override {key}: {part!r} holds {child!r}, not a mapping of options"
                )
            node = child
        node[parts[-1]] = value
    return result


def load_run_config(
    path: str | Path | None = None, overrides: Iterable[tuple[str, Any]] = ()
) -> RunConfig:
    """The RunConfig of a file (or the defaults) with overrides applied, fully checked."""
    raw = read_config_file(path) if path is not None else {}
    return run_config_from_dict(apply_overrides(raw, overrides))


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value
