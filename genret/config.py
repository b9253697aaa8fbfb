"""Dataclass configs: help text and validation in one place, loaded from TOML/YAML and fed to the CLI.

Every config is a ``@dataclass`` whose fields carry ``metadata={"help": ...}``. The same class
builds the command-line flags (:func:`add_arguments`) and reads a ``--config`` file
(:func:`from_dict`), so a flag and a config key never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
import yaml

from genret._io import write_text

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file and key."""


def check_bounds(config: Any, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Refuse settings below their bound, naming the first one: ``at_least_one`` must be >= 1, ``non_negative`` >= 0."""
    for name in at_least_one:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in non_negative:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must not be negative, got {getattr(config, name)}")


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a TOML or YAML file into a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: malformed {path.suffix.lstrip('.').upper() or 'config'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return data


def write_config_file(path: str | os.PathLike, data: dict) -> None:
    """Write a dict as TOML or YAML by the file's suffix, atomically."""
    path = Path(path)
    text = tomli_w.dumps(_drop_none(data)) if path.suffix == ".toml" else yaml.safe_dump(data, sort_keys=False)
    write_text(path, text)


def _drop_none(obj: Any) -> Any:
    # TOML has no null: a missing key means "the default".
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_drop_none(v) for v in obj]
    return obj


def to_dict(config: Any) -> dict:
    """A config dataclass as plain data (tuples become lists)."""
    return dataclasses.asdict(config)


def _resolve(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type[C], data: dict, where: str = "config") -> C:
    """Build config ``cls`` from a dict, naming any unknown key or wrongly typed value.

    Example:
        >>> from dataclasses import dataclass, field
        >>> @dataclass
        ... class Demo:
        ...     k: int = field(default=10, metadata={"help": "candidates"})
        >>> from_dict(Demo, {"k": 5})
        Demo(k=5)
        >>> from_dict(Demo, {"kk": 5})
        Traceback (most recent call last):
        ...
        genret.config.ConfigError: config: unknown key 'kk' (known: k)
    """
    hints = _resolve(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(fields)})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per scalar field of ``cls``, with its help text; defaults are left unset.

    Unset flags stay ``None`` so :func:`merge_arguments` can tell them from values given.
    """
    hints = _resolve(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
        if base not in (int, float, str, bool, dict) and typing.get_origin(base) is not dict:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")  # argparse formats help with %
        if base is dict or typing.get_origin(base) is dict:
            parser.add_argument(flag, dest=f.name, type=_json_table(flag), default=None, metavar="JSON", help=help_text)
        elif base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)


def _json_table(flag: str):
    """An argparse type reading a JSON object (``'{"max_pixels": 200704}'``), with an error naming the flag."""
    def parse(text: str) -> dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"{flag} takes a JSON table such as '{{\"max_pixels\": 200704}}': "
                                             f"{err.msg}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} takes a JSON table (an object), got {text!r}")
        return value
    return parse


def merge_arguments(cls: type[C], args: argparse.Namespace, config_file: str | None = None) -> C:
    """Build ``cls`` from an optional config file, then the flags given on the command line."""
    data = read_config_file(config_file) if config_file else {}
    names = {f.name for f in dataclasses.fields(cls)}
    data.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return from_dict(cls, data, where=str(config_file or "arguments"))
