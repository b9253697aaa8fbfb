"""The inputs of a command: every path it reads, for the refusal of an output that is or holds one.

An output folder that is, holds or lies inside something a command reads would destroy or change it (``--out``
naming the data folder, or the folder of the encoder a pipeline file names). :func:`command_inputs` finds them all:
every argument that names an existing path, what the pipeline files and saved pipelines among them name in turn
(encoder, models, adapters, prompt files, the gallery's images), and the folder holding the images a data file names.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from genret.config import ConfigError

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")


def command_inputs(args: argparse.Namespace) -> list[Path]:
    """Every path a command reads: each argument that names an existing path, and what the pipeline files and saved
    pipelines among them name in turn (encoder, models, adapters, prompt files, the gallery's images), resolved."""
    found: dict[Path, None] = {}

    def add(path: Path) -> None:
        path = path.resolve()
        if path in found:
            return
        found[path] = None
        table = None
        if path.is_file() and path.suffix in CONFIG_SUFFIXES:
            table, base = _table(path), path.parent
        elif path.is_dir() and (path / "pipeline.toml").is_file():
            table, base = _table(path / "pipeline.toml"), path
            gallery = _table(path / "gallery" / "gallery.json") if (path / "gallery" / "gallery.json").is_file() else {}
            for key in ("image_root",):
                if isinstance(gallery.get(key), str):
                    add(path / gallery[key])
        for value in _strings(table):
            for candidate in (base / value, Path(value)):  # relative to the file, or (older files) to the working folder
                if value and candidate.exists():
                    add(candidate)

    for key, value in vars(args).items():
        if key != "out" and isinstance(value, str) and value and Path(value).exists():
            add(Path(value))
    if isinstance(getattr(args, "data", None), str):  # the folder holding every image the data names
        images = _image_folder(args.data, getattr(args, "image_root", None))
        if images is not None:
            add(images)
    return list(found)


def _image_folder(data: str, image_root: str | None) -> Path | None:
    """The deepest folder holding every image a data file names (None when it cannot be read: the command says why)."""
    from genret.data import load_dataset

    try:
        records = load_dataset(data, image_root=image_root).records
    except Exception:  # noqa: BLE001 - read again, and reported, by the command itself
        return None
    folders = {str(Path(r.path).resolve().parent) for r in records}
    return Path(os.path.commonpath(sorted(folders))) if folders else None


def _table(path: Path):
    from genret.config import read_config_file

    try:
        return read_config_file(path) if path.suffix in CONFIG_SUFFIXES else json.loads(path.read_text("utf-8"))
    except (ValueError, OSError, ConfigError, UnicodeDecodeError):
        return None  # read (and reported) by the command itself


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []
