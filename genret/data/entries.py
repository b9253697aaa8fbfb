"""Reading data set files and the fields of their entries, the same way for every format.

Every reader (Karpathy JSON, JSONL, CIRR, CIRCO) opens its files through :func:`read_json_file` /
:func:`read_jsonl_lines` and reads each entry's fields through an :class:`Entry`, so a wrong type (an id given as a
list, a caption as a number), bytes that are not UTF-8, or a file that is a symlink loop get one kind of error,
:class:`DatasetError`, naming the file and the entry (or line) and what the field must be.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

_MISSING = object()


class DatasetError(ValueError):
    """A data set file or entry that cannot be used; the message names the file and entry."""


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (missing, a symlink loop, a broken link, a folder), or ``None``."""
    try:
        os.stat(path)
    except OSError as err:
        if path.is_symlink():
            try:
                target = os.readlink(path)
            except OSError:
                target = "?"
            if err.errno == errno.ELOOP:
                return f"{path} is a symlink loop (it points to {target}, which leads back to itself)"
            return f"{path} is a broken symlink (it points to {target}, which does not exist)"
        if isinstance(err, FileNotFoundError):
            return f"{path} does not exist"
        return f"{path} cannot be read ({err.strerror or err})"
    if path.is_dir():
        return f"{path} is a folder, not a file"
    return None


def _read_bytes(path: Path, what: str) -> bytes:
    problem = file_problem(path)
    if problem and not path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if problem:
        raise DatasetError(f"{what}: {problem}")
    try:
        return path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the {what} ({err.strerror or err})") from None


def _decode(data: bytes, path: Path, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DatasetError(f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{data[err.start]:02x}); "
                           "save the file as UTF-8") from None


def read_json_file(path: str | os.PathLike, what: str = "dataset file") -> Any:
    """A JSON file's content; errors name the file and the line (syntax, encoding) or why it cannot be read."""
    path = Path(path)
    text = _decode(_read_bytes(path, what), path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: line {err.lineno}, column {err.colno}: malformed JSON ({err.msg})") from None
    except RecursionError:
        raise DatasetError(f"{path}: nested too deeply to read") from None


def read_jsonl_lines(path: str | os.PathLike, skipped: list[str] | None = None) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line; a line that is not UTF-8 or not JSON raises, or with a
    ``skipped`` list is noted there (file and line) and left out."""
    path = Path(path)
    data = _read_bytes(path, "dataset file")
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            line = _decode(raw, path, lineno)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}: line {lineno}: malformed JSON ({err.msg})") from None
            except RecursionError:
                raise DatasetError(f"{path}: line {lineno}: nested too deeply to read") from None
        except DatasetError as err:
            if skipped is None:
                raise
            skipped.append(str(err))
            continue
        yield lineno, value


def kind(value: Any) -> str:
    """What a JSON value is, in the words of the format (``a list``, ``true/false``, ``null``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"true/false ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value[:40]!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Entry:
    """The fields of one entry, each read with its type checked; a wrong one raises ``fail(message)``.

    Args:
        value: the entry as parsed (it must be a JSON object).
        fail: makes the error naming the file and the entry (``DatasetError("file: line 3: " + message)``).
    """

    def __init__(self, value: Any, fail: Callable[[str], DatasetError], prefix: str = "") -> None:
        if not isinstance(value, dict):
            raise fail(f"{prefix.rstrip('.')!r} must be an object, got {kind(value)}" if prefix
                       else f"expected an object, got {kind(value)}")
        self.data, self.fail, self.prefix = value, fail, prefix

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise self.fail(f"missing {self.prefix + key!r}")
        return default

    def id(self, key: str, default: Any = _MISSING) -> str:
        """An id: a string or a whole number (not true/false, not a list or object), as a string."""
        value = self._get(key, default)
        return as_id(value, self.prefix + key, self.fail)

    def optional_id(self, key: str) -> str | None:
        """An id, or ``None`` where the key is absent or null."""
        value = self.data.get(key)
        return None if value is None else as_id(value, self.prefix + key, self.fail)

    def ids(self, key: str, default: Any = _MISSING) -> tuple[str, ...]:
        """A list of ids."""
        value = self._get(key, default)
        if value is None:
            return ()
        if not isinstance(value, (list, tuple)):
            raise self.fail(f"{self.prefix + key!r} must be a list of ids, got {kind(value)}")
        return tuple(as_id(v, f"{self.prefix}{key}[{i}]", self.fail) for i, v in enumerate(value))

    def text(self, key: str, default: Any = _MISSING) -> str:
        """A non-blank string, stripped."""
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.fail(f"{self.prefix + key!r} must be text, got {kind(value)}")
        if not value.strip():
            raise self.fail(f"{self.prefix + key!r} is empty")
        return value.strip()

    def name(self, key: str, default: Any = _MISSING) -> str:
        """A non-empty string kept as written (a file name, a split)."""
        value = self._get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{self.prefix + key!r} must be a non-empty string, got {kind(value)}")
        return value

    def texts(self, key: str, items: str = "caption") -> tuple[str, ...]:
        """A list of non-blank strings (a single string counts as a list of one), stripped."""
        value = self._get(key, _MISSING)
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise self.fail(f"{self.prefix + key!r} must be a list of strings, got {kind(value)}")
        return tuple(as_text(v, f"{items} {j}", self.fail) for j, v in enumerate(value))

    def table(self, key: str, default: Any = _MISSING) -> dict:
        """A JSON object (``null`` reads as an empty one)."""
        value = self._get(key, default)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"{self.prefix + key!r} must be an object, got {kind(value)}")
        return value

    def rest(self, *known: str) -> dict:
        """The entry's other fields (kept as the record's metadata)."""
        return {k: v for k, v in self.data.items() if k not in known}


def as_id(value: Any, what: str, fail: Callable[[str], DatasetError]) -> str:
    """``value`` as an id string; ids are strings or whole numbers, nothing else."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise fail(f"{what!r} must be an id (a string or a whole number), got {kind(value)}")
    text = str(value)
    if not text.strip():
        raise fail(f"{what!r} is an empty id")
    return text


def as_text(value: Any, what: str, fail: Callable[[str], DatasetError]) -> str:
    """``value`` as a non-blank string, stripped."""
    if not isinstance(value, str):
        raise fail(f"{what} is {kind(value)}, not text")
    if not value.strip():
        raise fail(f"{what} is empty")
    return value.strip()
