"""Dataclass configs: help text and validation in one place, loaded from TOML/YAML and fed to the CLI.

Every config is a ``@dataclass`` whose fields carry ``metadata={"help": ...}``. The same class
builds the command-line flags (:func:`add_arguments`) and reads a ``--config`` file
(:func:`from_dict`), so a flag and a config key never drift apart.

Every value is checked against its field where it is read, in one place (:func:`check_value`): its type from the
annotation (no ``true`` for a whole number, no ``2.5`` for one), every float finite (``nan`` and ``inf`` are
refused), and the field's range, declared once in its metadata (``"range": at_least(1)``). A file's value is named
by file and key, a flag's by flag; a config built in Python is checked by :func:`check_fields` in its
``__post_init__``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tomli_w
import yaml

from genret._io import read_text, write_text

C = TypeVar("C")


class ConfigError(ValueError):
    """A config file or value that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``lo``..``hi`` (either may be open-ended; ``*_open`` excludes the bound)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return False
        return True

    def __str__(self) -> str:
        lo = None if self.lo is None else f"{'above' if self.lo_open else 'at least'} {self.lo:g}"
        hi = None if self.hi is None else f"{'below' if self.hi_open else 'at most'} {self.hi:g}"
        return " and ".join(p for p in (lo, hi) if p) or "any number"


def at_least(lo: float) -> Range:
    """``lo`` or more (``at_least(1)``: a count)."""
    return Range(lo=lo)


def above(lo: float) -> Range:
    """More than ``lo`` (``above(0)``: a duration)."""
    return Range(lo=lo, lo_open=True)


def between(lo: float, hi: float) -> Range:
    """From ``lo`` to ``hi``, both included (``between(0, 1)``: a fraction)."""
    return Range(lo=lo, hi=hi)


def _bound(metadata: Any) -> Range | None:
    rng = (metadata or {}).get("range")
    if rng is None or isinstance(rng, Range):
        return rng
    lo, hi = rng  # a (lo, hi) pair, both included, None for no bound
    return Range(lo=lo, hi=hi)


def check_number(value: Any, kind: type, where: str, rng: Range | None = None, strict: bool = True) -> Any:
    """``value`` as an ``int`` or a ``float`` of ``rng``, or a :class:`ConfigError` naming ``where``.

    ``true``/``false`` is never a number; a float is never a whole number; ``nan`` and infinities are refused. With
    ``strict`` off (a config built in Python), NumPy's integers and floats count too.
    """
    integral = numbers.Integral if not strict else int
    real = numbers.Real if not strict else (int, float)
    if isinstance(value, bool) or not isinstance(value, integral if kind is int else real):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{where}: expected {what}, got {value!r}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    else:
        value = int(value)
    if rng is not None and value not in rng:
        raise ConfigError(f"{where}: must be {rng}, got {value!r}")
    return value


def check_fields(config: Any) -> None:
    """Check a config built in Python the way :func:`from_dict` checks a file: each number's type, finiteness and
    declared range (``metadata["range"]``); called first in each config's ``__post_init__``.

    Raises:
        ConfigError: naming the field (``from_dict`` adds the file).
    """
    hints = _resolve(type(config))
    for f in dataclasses.fields(config):
        kind = _number_kind(hints.get(f.name))
        value = getattr(config, f.name)
        if kind is None or value is None:
            continue
        setattr(config, f.name, check_number(value, kind, f.name, _bound(f.metadata), strict=False))


def _number_kind(hint: Any) -> type | None:
    """``int`` or ``float`` for a field of that type (or that type or None), else None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if hint in (int, float) else None


def check_bounds(config: Any, at_least_one: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
    """Refuse settings below their bound, naming the first one: ``at_least_one`` must be >= 1, ``non_negative`` >= 0
    (and every one a finite number: NaN compares false with everything, so it is named too)."""
    for name in at_least_one:
        value = getattr(config, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        if not value >= 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    for name in non_negative:
        value = getattr(config, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        if not value >= 0:
            raise ValueError(f"{name} must not be negative, got {value}")


def read_config_file(path: str | os.PathLike) -> dict:
    """Read a TOML or YAML file into a dict, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = read_text(path, "config file", ConfigError)
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: malformed {path.suffix.lstrip('.').upper() or 'config'}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return data


def path_fields(cls: type) -> dict[str, str]:
    """The fields of ``cls`` that name a file or folder, by kind (``metadata["path"]``): ``"model"`` (a local
    directory or a Hugging Face hub id), ``"adapter"`` (a local adapter folder), ``"dir"`` (a local folder made when
    missing: a cache), ``"prompt"`` (a prompt name, or a ``.toml`` file)."""
    return {f.name: f.metadata["path"] for f in dataclasses.fields(cls) if f.metadata.get("path")}


def resolve_paths(cls: type, table: dict, folder: str | os.PathLike, where: str) -> dict:
    """``table``, a config file's settings for ``cls``, with every path in it resolved against ``folder``, the folder
    of the file that names it: the one rule for paths in config files (see :func:`resolve_path`)."""
    out = dict(table)
    for name, kind in path_fields(cls).items():
        value = out.get(name)
        if isinstance(value, str) and value:
            out[name] = resolve_path(value, kind, Path(folder), _key(where, name))
    return out


def resolve_path(value: str, kind: str, folder: Path, where: str) -> str:
    """A path-valued setting of a file in ``folder``, absolute; a hub id or a prompt name as it is.

    A relative path is taken relative to ``folder``. A ``"model"`` that is not there and does not read as a local path
    (``org/name``) is a hub id; a ``"prompt"`` without a suffix is a prompt name. A relative path found only in the
    working folder, not beside the file, is refused (it meant something else before this rule): the message gives the
    path to write.

    Raises:
        ConfigError: naming ``where`` (file and key).
    """
    from genret._hub import looks_local

    path = Path(value).expanduser()
    if path.is_absolute() or (kind == "prompt" and not path.suffix):
        return str(path) if path.is_absolute() else value
    beside = folder / path
    if beside.exists():
        return str(beside.resolve())
    if path.exists() and folder.resolve() != Path.cwd().resolve():
        raise ConfigError(f"{where}: {value!r} is not beside the file ({beside} does not exist) but is in the working "
                          f"folder; paths in a config file are relative to the file: write "
                          f"{os.path.relpath(path.resolve(), folder.resolve())!r} or an absolute path")
    if kind == "model" and not looks_local(value, folder):
        return value  # a Hugging Face hub id
    return str(beside.resolve())


def relative_paths(cls: type, table: dict, folder: str | os.PathLike) -> dict:
    """``table`` with its local paths (the :func:`path_fields` of ``cls``) written relative to ``folder``, where the
    file that holds them is saved: it then loads from any working folder (hub ids and prompt names kept)."""
    from genret._hub import looks_local

    out = dict(table)
    for name, kind in path_fields(cls).items():
        value = out.get(name)
        if not isinstance(value, str) or not value or (kind == "prompt" and not Path(value).suffix):
            continue
        if kind != "model" or looks_local(value):
            out[name] = os.path.relpath(Path(value).expanduser().resolve(), Path(folder).resolve())
    return out


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


def check_value(value: Any, hint: Any, where: str, rng: Range | None = None) -> Any:
    """``value`` read from a file or flag for a field annotated ``hint``: its type checked (numbers finite and in
    ``rng``), tuples and nested configs built, or a :class:`ConfigError` naming ``where`` (file and key)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_value(value, inner[0], where, rng) if len(inner) == 1 else _finite(value, where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return from_dict(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(check_value(v, item, f"{where}[{i}]", rng) for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(_finite(value, where))
    if hint in (int, float):
        return check_number(value, hint, where, rng)
    if hint in (str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected {'true or false' if hint is bool else 'a string'}, got {value!r}")
    return _finite(value, where)


def _finite(value: Any, where: str) -> Any:
    """``value`` with every float inside it checked to be finite (a table of free-form settings, a list)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _finite(item, f"{where}[{i}]")
    return value


def _key(where: str, key: str) -> str:
    """Where ``key`` is: ``file.toml: key`` under a file, ``file.toml: stages[0].key`` deeper."""
    return f"{where}.{key}" if ": " in where or where.endswith("]") else f"{where}: {key}"


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
    kwargs = {k: check_value(v, hints[k], _key(where, k), _bound(fields[k].metadata)) for k, v in data.items()}
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
        elif base in (int, float):
            parser.add_argument(flag, dest=f.name, type=number_arg(base, _bound(f.metadata)), default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)


def number_arg(kind: type, rng: Range | None = None):
    """An argparse type for a number flag: a whole number (``kind=int``) or a finite float, within ``rng``; argparse
    names the flag in its error (``argument -k/--k: must be at least 1, got -1``).

    Example:
        >>> number_arg(int, at_least(1))("3")
        3
    """
    def parse(text: str):
        try:
            value = int(text, 10) if kind is int else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        try:
            return check_number(value, kind, "", rng)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(": ")) from None

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = number_arg(int, at_least(1))
"""An argparse type: a whole number from 1 (``-k``, ``--limit``, ``--queries``...)."""
NON_NEGATIVE_INT = number_arg(int, at_least(0))
"""An argparse type: a whole number from 0."""
FINITE_FLOAT = number_arg(float)
"""An argparse type: any finite number (``nan`` and ``inf`` refused)."""
FRACTION = number_arg(float, between(0, 1))
"""An argparse type: a finite number from 0 to 1 (a recall, a confidence)."""


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
        try:
            return _finite(value, flag)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def merge_arguments(cls: type[C], args: argparse.Namespace, config_file: str | None = None) -> C:
    """Build ``cls`` from an optional config file, then the flags given on the command line."""
    data = read_config_file(config_file) if config_file else {}
    if config_file:  # a path in the file is relative to the file; one on the command line, to the working folder
        data = resolve_paths(cls, data, Path(config_file).parent, str(config_file))
    names = {f.name for f in dataclasses.fields(cls)}
    data.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return from_dict(cls, data, where=str(config_file or "arguments"))
