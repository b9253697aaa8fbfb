"""The artefact layer: every folder genret saves, and every file it writes, goes through here and :mod:`genret._swap`.

A saved folder (an *artefact*: pipeline, index, adapter, checkpoint, trained model, world, eval report) holds a
manifest (``manifest.json``, ``genret.json`` or ``trainer_state.json``) that says what made it and, under
``files``, every file it holds: relative name, size, a whole-content SHA-256 and a sampled hash (size plus blocks
spread over the file) that loading checks in constant time per file; ``genret verify`` checks the full hash. The
manifest carries a digest of its own fields, so a hand edit is refused too. Writing (who owns which file, the swap
that replaces a folder) is :mod:`genret._swap`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

OWNER = "genret"
MANIFEST_NAMES = ("manifest.json", "genret.json", "trainer_state.json")
RUN_MARKER = ".genret-run.json"
"""Written by a training run into its output folder: the folders it owns while it runs (checkpoints, logs)."""
RUN_FOLDERS = ("checkpoints", "logs")
TMP_MARK = ".genret-"
"""In the name of every temporary path genret makes (``.NAME.genret-XXXX.tmp``): never a name a user picks."""
SMALL = 8 << 20  # files up to 8 MiB are hashed whole on load
BLOCK = 1 << 16
SAMPLES = 16
FORMATS = {".json": "json", ".faiss": "faiss", ".safetensors": "safetensors", ".sqlite": "sqlite",
           ".toml": "toml", ".yaml": "yaml", ".md": "markdown", ".png": "png", ".jinja": "jinja", ".txt": "text",
           ".jsonl": "jsonl", ".model": "sentencepiece"}


class ManifestError(ValueError):
    """A saved artefact whose manifest does not describe what the loader expects."""


class ArtefactError(ManifestError):
    """A saved artefact whose files are not those its manifest lists (missing, cut short, replaced, edited)."""


class OutputError(ValueError):
    """An output folder that would replace or hold something it must not (the user's files, an input)."""


# ---------------------------------------------------------------------------------------------------- files


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On any error the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", suffix=".tmp", dir=path.parent)
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
    """Write ``obj`` as indented JSON, atomically (NaN and infinities refused: they are not JSON)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_text(path: str | os.PathLike, what: str = "file", error: type[Exception] = ValueError) -> str:
    """A text file's content, with errors (of class ``error``) that name the file, and the line of a byte that is
    not UTF-8."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise error(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise error(f"{path}: line {line}: not UTF-8 text; save the {what} as UTF-8") from None


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
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror})") from None


def fingerprint(path: str | os.PathLike, full: bool = False, samples: int = SAMPLES) -> str:
    """A content hash of a file: SHA-256 of it whole (``full``, or at most :data:`SMALL` bytes), else of its size
    and ``samples`` blocks spread evenly over it (first and last included): constant time for any size."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if full or size <= SMALL:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            return h.hexdigest()
        h.update(str(size).encode())
        for i in range(samples):
            fh.seek((size - BLOCK) * i // (samples - 1))
            h.update(fh.read(BLOCK))
    return "sample:" + h.hexdigest()


def describe_file(path: Path) -> dict:
    """A manifest's entry for one file: size, whole-content SHA-256, sampled hash, format."""
    entry = {"size": path.stat().st_size, "sha256": fingerprint(path, full=True)}
    entry["sample"] = entry["sha256"] if entry["size"] <= SMALL else fingerprint(path)
    entry["format"] = FORMATS.get(path.suffix.lower(), "binary")
    return entry


def _walk(folder: Path, empty_dirs: bool = False) -> Iterator[tuple[str, Path]]:
    """Every non-directory entry under ``folder`` (symbolic links not followed), by relative POSIX name; with
    ``empty_dirs``, empty folders too (as ``name/``).

    Raises:
        OSError: a folder under ``folder`` that cannot be read (what it holds cannot be seen, so cannot be kept).
    """
    def fail(err: OSError) -> None:
        raise err

    for root, dirs, files in os.walk(folder, followlinks=False, onerror=fail):
        dirs.sort()
        base = Path(root)
        for name in sorted(files) + [d for d in dirs if (base / d).is_symlink()]:
            path = base / name
            yield path.relative_to(folder).as_posix(), path
        if empty_dirs and base != folder and not dirs and not files:
            yield base.relative_to(folder).as_posix() + "/", base


# ------------------------------------------------------------------------------------------------ manifests


def manifest_file(folder: str | os.PathLike) -> Path | None:
    """The manifest a folder holds (the first of :data:`MANIFEST_NAMES` that is there), or None."""
    for name in MANIFEST_NAMES:
        path = Path(folder) / name
        if path.is_file() and not path.is_symlink():
            return path
    return None


def _parse(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return found if isinstance(found, dict) else None


def seal(folder: str | os.PathLike, name: str | None = None, manifest: dict | None = None) -> Path:
    """Write ``folder``'s manifest with the list of every file it holds (their sizes and hashes) and its owner.

    Args:
        name: the manifest's file name (default: the one the folder holds, else ``manifest.json``).
        manifest: the fields to write (default: those of the manifest already there).
    """
    folder = Path(folder)
    found = manifest_file(folder)
    path = folder / name if name else (found or folder / "manifest.json")
    if manifest is None:
        manifest = _parse(path) if path.is_file() else None
        if manifest is None:
            raise ManifestError(f"{path}: no manifest to seal")
    files = {rel: describe_file(p) for rel, p in _walk(folder)
             if rel != path.name and not p.is_symlink() and TMP_MARK not in p.name}
    sealed = {**{k: v for k, v in manifest.items() if k not in ("files", "owner", "digest")}, "owner": OWNER,
              "files": files}
    write_json(path, {**sealed, "digest": _digest(sealed)})
    return path


def _digest(manifest: dict) -> str:
    """The SHA-256 of a manifest's fields but its digest: a manifest edited by hand no longer matches."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_files(folder: str | os.PathLike, manifest: dict, what: str = "artefact", full: bool = False) -> int:
    """Check that ``folder`` holds the files ``manifest`` lists, with their sizes and hashes.

    A manifest written before genret listed files (no ``files``) is let through with a warning.

    Args:
        full: compare whole-content SHA-256s (``genret verify``) rather than sampled hashes.

    Returns:
        How many files were checked.

    Raises:
        ArtefactError: naming the first file that is missing, of another size, or of other content.
    """
    folder = Path(folder)
    files = manifest.get("files")
    if not any(key in manifest for key in ("files", "owner", "digest")):
        logger.warning("%s: a %s saved by an earlier genret, whose manifest lists no files: its content cannot be "
                       "checked; save it again to have it checked", folder, what)
        return 0
    if manifest.get("digest") != _digest(manifest):
        raise ArtefactError(f"{folder}: its manifest was edited after it was saved (its digest does not match its "
                            f"fields); save the {what} again rather than editing it")
    if not isinstance(files, dict):
        raise ArtefactError(f"{folder}: the manifest's 'files' is not a table of files; the manifest was edited: "
                            f"save the {what} again")
    root = folder.resolve()
    for rel, entry in files.items():
        path = folder / rel
        if not isinstance(entry, dict) or Path(rel).is_absolute() or root not in (root / rel).resolve().parents:
            raise ArtefactError(f"{folder}: the manifest lists {rel!r} oddly; the manifest was edited: save the "
                                f"{what} again")
        if path.is_symlink() or not path.is_file():
            raise ArtefactError(f"{path}: missing from the {what} (its manifest lists it); the folder was modified: "
                                "save it again")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise ArtefactError(f"{path}: {size} bytes, the manifest of this {what} says {entry.get('size')}: it was "
                                "cut short or replaced by another file; save the artefact again")
        key = "sha256" if full else "sample"
        found = fingerprint(path, full=True) if full else cached_fingerprint(path)  # verify: read it now, whole
        if found != entry.get(key):
            raise ArtefactError(f"{path}: its content is not what the manifest of this {what} lists (hash mismatch): "
                                "it was edited or taken from another artefact; save the artefact again")
    return len(files)


_HASHES: dict[tuple, str] = {}


def cached_fingerprint(path: Path, full: bool = False, samples: int = SAMPLES) -> str:
    """:func:`fingerprint`, remembered for a file of the same size, time and inode (within this process)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, full, samples)
    if key not in _HASHES:
        _HASHES[key] = fingerprint(path, full=full, samples=samples)
    return _HASHES[key]


def read_manifest(folder: str | os.PathLike, fmt: str, version: int, what: str, name: str = "manifest.json") -> dict:
    """Read ``folder/name``, check its format name and version, and check the files it lists.

    Raises:
        ManifestError: naming the folder, when the format or version is not the expected one.
        ArtefactError: naming the file, when a listed file is missing or not what was saved.
    """
    folder = Path(folder)
    manifest = read_json(folder / name, what=f"{what} manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ManifestError(f"{folder}: not a saved genret {what} (manifest format {found!r}, expected {fmt!r})")
    if manifest.get("version") != version:
        raise ManifestError(f"{folder}: {what} format version {manifest.get('version')}, this genret reads {version}")
    check_files(folder, manifest, what)
    return manifest


WORLD_GENERATORS = ("genret.world.synth", "genret.data.synth")
"""The miniature world's generator, as a world's ``dataset_synth.json`` names it (worlds made before the generator moved to :mod:`genret.world`: ``genret.data.synth``)."""


def artefact_format(folder: str | os.PathLike) -> str | None:
    """The ``format`` of the genret artefact a folder holds, or None when it holds none.

    A training run in progress has a run marker (:data:`RUN_MARKER`) instead of a manifest
    (``"genret.train_run"``); a world made before worlds had manifests is known by its ``dataset_synth.json``.
    """
    folder = Path(folder)
    path = manifest_file(folder)
    if path is not None:
        found = _parse(path)
        return found.get("format") if found else None
    if (folder / RUN_MARKER).is_file():
        return "genret.train_run"
    world = _parse(folder / "dataset_synth.json") if (folder / "dataset_synth.json").is_file() else None
    made = world.get("genret") if world else None
    if isinstance(made, dict) and made.get("generator") in WORLD_GENERATORS:
        return "genret.world"
    return None


# --------------------------------------------------------------------------------------------------- verify


def verify(path: str | os.PathLike) -> list[dict]:
    """Check every artefact under ``path`` fully: each manifest's files against their whole-content SHA-256.

    Returns:
        One record per artefact found (and per file named like a manifest that is not a readable one): its folder,
        format, how many files were checked, and ``error`` (the message) where one does not match.
    """
    path = Path(path)
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if TMP_MARK not in d)
        folder = Path(root)
        names = [n for n in MANIFEST_NAMES if n in files or (folder / n).is_symlink()]
        if not names:
            continue
        first = folder / names[0]
        manifest = None if first.is_symlink() else _parse(first)
        if manifest is not None and str(manifest.get("format", "")).endswith("_cache"):
            continue  # a cache (append-only shards, each checked as it is read), not a saved artefact
        record = {"folder": str(folder), "format": (manifest or {}).get("format"), "files": 0, "error": None}
        if manifest is None or "format" not in manifest:
            if names[0] == "genret.json" and manifest is not None:  # a model's summary without a format: not ours
                continue
            record["error"] = f"{first}: not a readable genret manifest (a link, not JSON, or no format)"
        elif manifest.get("files") is None and not any(k in manifest for k in ("owner", "digest")):
            record["error"] = "saved by an earlier genret: its manifest lists no files, so nothing can be checked"
        else:
            try:
                record["files"] = check_files(folder, manifest, str(manifest.get("format")), full=True)
            except (ManifestError, OSError, ValueError) as err:
                record["error"] = str(err)
        found.append(record)
    return found


def check_safetensors(path: str | os.PathLike) -> None:
    """Check that a safetensors file is whole: its header parses and its size is what the header says.

    Reads only the header, so it costs nothing for multi-GB weights.

    Raises:
        ArtefactError: naming the file, when it is cut short, padded, or not a safetensors file.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or 8 + n > size:
                raise ValueError("no header")
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        raise ArtefactError(f"{path}: not a readable safetensors file (its header is missing or damaged); the file is "
                            "cut short or is another file: copy or save it again") from None
    if 8 + n + end != size:
        raise ArtefactError(f"{path}: {size} bytes, its header describes {8 + n + end}: the file was cut short or "
                            "damaged; copy or save it again")


def check_local_model(folder: str | os.PathLike, what: str = "model") -> None:
    """Before loading a local model or adapter folder: the files its genret manifest lists (where it has one)
    and every safetensors file whole.

    Raises:
        ArtefactError: naming the file that is missing, cut short or not what was saved.
    """
    folder = Path(folder)
    for name in MANIFEST_NAMES:
        if (folder / name).is_symlink():
            raise ArtefactError(f"{folder / name}: a symbolic link; a genret manifest is a file of its own folder: "
                                f"copy the {what} as files")
    path = manifest_file(folder)
    manifest = _parse(path) if path is not None else None
    if manifest is not None and (manifest.get("owner") == OWNER or str(manifest.get("format", "")).startswith("genret.")):
        check_files(folder, manifest, what)  # a genret artefact: its files as saved (one from before file lists: warned)
    for file in sorted(folder.glob("*.safetensors")):
        check_safetensors(file)
