"""Atomic file writes and JSON helpers shared by every artefact that genret saves."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any error the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp makes owner-only files; saved artefacts are ordinary files
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON with an error that names the file and the position of a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}, column {err.colno}: malformed JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; is it the right file?") from None


class ManifestError(ValueError):
    """A saved artefact whose manifest does not describe what the loader expects."""


def read_manifest(folder: str | os.PathLike, fmt: str, version: int, what: str) -> dict:
    """Read ``folder/manifest.json`` and check its format name and version.

    Raises:
        ManifestError: naming the folder, when the format or version is not the expected one.
    """
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json", what=f"{what} manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ManifestError(f"{folder}: not a saved genret {what} (manifest format {found!r}, expected {fmt!r})")
    if manifest.get("version") != version:
        raise ManifestError(f"{folder}: {what} format version {manifest.get('version')}, this genret reads {version}")
    return manifest


MANIFEST_NAMES = ("manifest.json", "genret.json", "trainer_state.json")
_OVERWRITE: set[Path] = set()


class OutputError(ValueError):
    """An output folder that would replace or hold something it must not (the user's files, an input)."""


WORLD_GENERATORS = ("genret.world.synth", "genret.data.synth")
"""The miniature world's generator, as a world's ``dataset_synth.json`` names it (worlds made before the generator moved to :mod:`genret.world`: ``genret.data.synth``)."""


def artefact_format(folder: str | os.PathLike) -> str | None:
    """The ``format`` of the genret manifest a folder holds, or None when it holds none.

    Two folders have no manifest of their own: a training run in progress (``checkpoints/`` of
    trainer states, or only ``checkpoints/`` and the trackers' ``logs/``: ``"genret.train_run"``) and the miniature world (``dataset_synth.json`` that genret's
    generator wrote: ``"genret.world"``).
    """
    folder = Path(folder)
    run = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").glob("*/trainer_state.json"))
    if not run and folder.is_dir() and (folder / "logs").is_dir():  # a run that logs to trackers, before its result
        run = {p.name for p in folder.iterdir()} <= {"checkpoints", "logs"}
    if run and not any((folder / n).is_file() for n in MANIFEST_NAMES):
        return "genret.train_run"
    world = folder / "dataset_synth.json"
    if world.is_file():
        try:
            made = json.loads(world.read_text(encoding="utf-8")).get("genret", {})
        except (ValueError, UnicodeDecodeError, AttributeError):
            made = {}
        if isinstance(made, dict) and made.get("generator") in WORLD_GENERATORS:
            return "genret.world"
    for name in MANIFEST_NAMES:
        path = Path(folder) / name
        if path.is_file():
            try:
                found = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                return None
            return found.get("format") if isinstance(found, dict) else None
    return None


@contextmanager
def overwrite_allowed(*paths: str | os.PathLike) -> Iterator[None]:
    """Within the block, :func:`atomic_dir` may replace these folders whatever they hold (``--overwrite``)."""
    added = {Path(p).resolve() for p in paths} - _OVERWRITE
    _OVERWRITE.update(added)
    try:
        yield
    finally:
        _OVERWRITE.difference_update(added)


def check_output_dir(path: str | os.PathLike, formats: tuple[str, ...] = (), *, inputs=(), what: str = "output") -> Path:
    """Refuse an output folder that writing would damage; nothing is created or removed here.

    Refused whatever ``overwrite`` says: a path that is a file, the working folder or a folder above it,
    and a folder that is, or holds, one of ``inputs``. Refused unless :func:`overwrite_allowed`: an
    existing non-empty folder that is not a genret artefact of one of ``formats``.

    Raises:
        OutputError: naming the path and what to do.
    """
    path = Path(path)
    resolved = path.resolve()
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a folder: name a folder for the {what} (nothing was written)")
    here = Path.cwd().resolve()
    if resolved == here or resolved in here.parents:
        raise OutputError(f"{path} is the working folder or one above it: name a new folder for the {what}, "
                          "e.g. runs/NAME (nothing was written)")
    for given in inputs:
        if given is None:
            continue
        inp = Path(given).resolve()
        if inp == resolved or resolved in inp.parents:
            raise OutputError(f"{path} holds an input of this command ({given}): writing the {what} there would "
                              "destroy it; name another folder (nothing was written)")
    if path.is_dir() and any(path.iterdir()) and resolved not in _OVERWRITE:
        found = artefact_format(path)
        if not formats or found not in formats:
            entries = sorted(p.name for p in path.iterdir())
            kind = f"a {found!r} artefact" if found else "not a genret artefact"
            raise OutputError(f"{path} exists and is {kind} ({len(entries)} entries, e.g. {entries[0]!r}); it would "
                              f"be replaced whole: name a new folder for the {what}, or pass --overwrite "
                              "(nothing was written)")
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike, formats: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    A failure leaves any previous ``path`` untouched and removes the partial directory. ``path`` must be
    new, empty, or a genret artefact of one of ``formats`` (see :func:`check_output_dir`). The swap
    renames the old folder to ``.NAME.old`` and the new one into place; a process killed between the two
    leaves ``.NAME.old`` as the only complete copy, so the next write (or :func:`recover_dir`) puts it back.
    """
    path = Path(path)
    recover_dir(path)
    check_output_dir(path, formats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: str | os.PathLike) -> bool:
    """Put back ``.NAME.old`` where a swap was cut off before the new folder took ``path``'s place."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)
        return True
    return False
