"""Job configs: a dataclass filled from an optional JSON/YAML file, then ``key=value`` overrides.

Overrides use dotted keys for nested dicts (``sampler.num_steps=10``); values are parsed as JSON when
they parse (numbers, booleans, lists, objects) and taken as strings otherwise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field names to values")
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data, default=str))  # a deep copy
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a nested mapping")
        node[leaf] = value
    return data


class UnknownConfigField(ValueError):
    """A config names a field the dataclass does not have."""


def build_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                 base: Mapping[str, Any] | None = None) -> T:
    """Defaults ← file (or ``base`` when no file is given) ← overrides; unknown field names are an error
    that lists the known ones."""
    data = read_config_file(path) if path else dict(base or {})
    defaults = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    merged = apply_overrides({**defaults, **data}, overrides)
    unknown = sorted(set(merged) - set(defaults))
    if unknown:
        raise UnknownConfigField(f"unknown config field(s) {unknown}; known fields: {sorted(defaults)}")
    return cls(**merged)
