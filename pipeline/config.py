"""Typed config trees: nested dataclasses built from a mapping (a recipe, a file, ``--set`` overrides).

:func:`build` walks the dataclass's type hints all the way down and coerces every leaf to its declared type:
``int`` (integral values only: ``10.5`` is an error, ``"10"`` is 10), ``float`` (``"1e-5"``, which YAML reads
as a string, is 1e-5), ``bool``, ``str``, ``Literal[...]`` (one of the listed values), ``X | None``,
``list[X]`` / ``tuple[X, ...]``, ``dict`` and nested dataclasses. An unknown field names its dotted path and
the closest valid field; a value a dataclass's own checks reject (its ``__post_init__`` raises
``ValueError("field=value: expected …")``) is reported under its dotted path too. Every message is a
:class:`ConfigError`.

Overrides are ``dotted.key=value``; values parse as JSON, then YAML, else stay strings. Later overrides win,
and a mapping merges into a mapping (``--config`` merges over the recipe rather than replacing it).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be built; the message names the dotted field and what was expected."""


# ------------------------------------------------------------------------------------------------ files and overrides
def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field names to values")
    return data


def parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    out = json.loads(json.dumps(base, default=str))  # a deep copy
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = json.loads(json.dumps(v, default=str))
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` applied in order on a copy of ``data``."""
    data = merge({}, data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (dotted keys for nested fields: train.lr=1e-4)")
        node = data
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                if node.get(part) is not None and part in node:
                    raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a nested section")
                node[part] = {}  # absent, or an optional section that is off (None): switch it on
            node = node[part]
        value = parse_value(raw)
        node[leaf] = merge(node[leaf], value) if isinstance(value, dict) and isinstance(node.get(leaf), dict) else value
    return data


# ------------------------------------------------------------------------------------------------ building
def _dotted(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else str(name)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}={value!r}: expected one of {args}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            raise ConfigError(f"{path}={value!r}: expected one of {list(allowed)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        return value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, str) and "name" in {f.name for f in dataclasses.fields(tp)}:
            value = {"name": value}  # shorthand: a section with a ``name`` may be given by its name alone
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}={value!r}: expected a mapping of {tp.__name__} fields")
        return build(tp, value, path)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: expected a list")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_coerce(item, v, _dotted(path, i)) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}={value!r}: expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{path}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected an integer")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"{path}={value!r}: expected an integer") from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int):
            return value
        raise ConfigError(f"{path}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}={value!r}: expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{path}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, Path):
            return str(value)
        raise ConfigError(f"{path}={value!r}: expected a string")
    return value


def build(cls: type[T], data: Mapping[str, Any] | None = None, path: str = "") -> T:
    """A ``cls`` from a (nested) mapping, with every leaf coerced and every check run; see the module docstring."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, list(fields), n=1, cutoff=0.6)
        hint = f"did you mean {_dotted(path, close[0])!r}? " if close else ""
        raise ConfigError(f"unknown config field {_dotted(path, name)!r}; {hint}"
                          f"valid fields{' of ' + path if path else ''}: {', '.join(sorted(fields))}")
    kwargs = {name: _coerce(hints[name], value, _dotted(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}.{err}" if path and not str(err).startswith(path) else str(err)) from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config tree as plain JSON-able data (what --print-config shows and run directories record)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def fingerprint(cfg: Any) -> str:
    """A short digest of a config tree (or of plain JSON-able data): equal exactly when the data are equal."""
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def leaves(data: Any, path: str = "") -> dict[str, Any]:
    """``{"train.lr": 1e-4, …}``: every leaf of a nested mapping by its dotted path."""
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(leaves(v, _dotted(path, k)))
        return out
    return {path: data}


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted paths whose values differ between two config dicts, with (old, new)."""
    a, b = leaves(old), leaves(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def sections(obj: Any, **classes: type) -> None:
    """In a (frozen) dataclass's ``__post_init__``: build the named fields from mappings (or a section's name)
    when a caller passed plain values (``TrainConfig(objective={"name": "ddspo"})``, ``objective="ddspo"``), so
    the tree is typed however it was made."""
    for name, cls in classes.items():
        value = getattr(obj, name)
        if isinstance(value, (Mapping, str)):
            object.__setattr__(obj, name, _coerce(cls, value, name))


def absolute_paths(obj: Any, *names: str) -> None:
    """In a (frozen) dataclass's ``__post_init__``: make the named local-path fields absolute, relative to this
    process's working directory. Ray Train's workers and Ray Data's actors do not run in the driver's working
    directory, so a relative ``model=./my_model`` would name another folder there. Empty values and values with
    a scheme (sources such as ``toy:train`` or ``toy_video:heldout``, remote URIs such as ``s3://bucket/x``) are
    left as they are; a reward spec (a mapping, or a list of them) has its ``path`` and ``*_path`` keys made absolute."""
    for name in names:
        object.__setattr__(obj, name, _absolute(getattr(obj, name), True))


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+._-]*:")  # "_": toy_video:heldout


def _absolute(value: Any, is_path: bool) -> Any:
    if isinstance(value, str):
        return str(Path(value).expanduser().absolute()) if is_path and value and not _SCHEME.match(value) else value
    if isinstance(value, Mapping):
        return {k: _absolute(v, k == "path" or str(k).endswith("_path")) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_absolute(v, False) for v in value)
    return value
