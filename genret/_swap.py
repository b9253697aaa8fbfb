"""Writes that never lose the user's files: who owns what in a folder, and the swap that replaces an artefact.

A saved folder's files are genret's when its manifest (:mod:`genret._io`) lists them and they are still as listed;
everything else in it is the user's. :func:`atomic_dir` fills a new folder under a unique, marked temporary name
beside the target, seals it, keeps the user's files (hard links into the new folder: the same files), and exchanges
the two folders atomically (Linux ``renameat2``), so a kill at any instant leaves the old or the new artefact whole.
It refuses, before any work, a folder holding the user's files unless ``--overwrite`` (:func:`overwrite_allowed`),
and never removes or moves a path that is not genret's.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from genret._io import (OWNER, RUN_FOLDERS, RUN_MARKER, TMP_MARK, ManifestError, OutputError, _digest, _parse, _walk,
                        artefact_format, cached_fingerprint, manifest_file, seal, write_json)

logger = logging.getLogger(__name__)

_OVERWRITE: set[Path] = set()


class _KeptNew(OutputError):
    """A write refused at the swap, its new artefact kept at its temporary name (the message says where)."""


def owned_files(folder: str | os.PathLike) -> set[str]:
    """The relative names of the files in ``folder`` that genret wrote there and nobody changed since: those its
    manifest lists (the manifest's digest valid; each a regular file inside the folder, of the listed size and
    sampled hash), the manifest itself, and the folders a training run's marker claims (its checkpoints and logs).

    A listed file the user has since edited, or a manifest edited by hand, is not genret's any more: it counts as
    the user's.
    """
    folder = Path(folder)
    owned: set[str] = set()
    path = manifest_file(folder)
    manifest = _parse(path) if path is not None else None
    if (manifest is not None and manifest.get("owner") == OWNER and isinstance(manifest.get("files"), dict)
            and manifest.get("digest") == _digest(manifest)):
        owned.add(path.name)
        owned |= {rel for rel, entry in manifest["files"].items() if _as_listed(folder, rel, entry)}
    marker = _parse(folder / RUN_MARKER) if _plain_file(folder, RUN_MARKER) else None
    if marker is not None and marker.get("owner") == OWNER:
        owned.add(RUN_MARKER)
        claimed = [d for d in marker.get("folders", []) if d in RUN_FOLDERS and not (folder / d).is_symlink()]
        owned |= {rel for rel, _ in _walk(folder, empty_dirs=True) if rel.split("/", 1)[0] in claimed}
    return owned


def _plain_file(folder: Path, rel: str) -> bool:
    """Whether ``rel`` names a regular file inside ``folder`` reached through no symbolic link."""
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or any(p in ("..", ".", "") for p in parts):
        return False
    path = folder
    for part in parts:
        path = path / part
        if path.is_symlink():
            return False
    return path.is_file()


def _as_listed(folder: Path, rel: str, entry) -> bool:
    """Whether the file ``rel`` is still what the manifest lists (size and sampled hash)."""
    if not isinstance(entry, dict) or not _plain_file(folder, rel):
        return False
    path = folder / rel
    try:
        return path.stat().st_size == entry.get("size") and cached_fingerprint(path) == entry.get("sample")
    except OSError:
        return False


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """The relative names of the entries under ``folder`` genret did not write there (or that were changed since):
    the user's, empty folders included (as ``name/``).

    Raises:
        OutputError: a folder under ``folder`` cannot be read (genret will not write beside what it cannot see).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    try:
        owned = owned_files(folder)
        return [rel for rel, _ in _walk(folder, empty_dirs=True) if rel not in owned]
    except OSError as err:
        raise OutputError(f"{err.filename}: cannot be read ({err.strerror}); genret does not write beside files it "
                          "cannot see: fix its permissions or name another folder (nothing was written)") from None


def mark_run(folder: str | os.PathLike) -> None:
    """Record in ``folder`` that a training run writes its checkpoints and logs there (see :func:`owned_files`):
    it claims only the folders of those names that are not there yet (one the user had stays the user's)."""
    folder = Path(folder)
    path = folder / RUN_MARKER
    if not path.is_file():
        new = [d for d in RUN_FOLDERS if not (folder / d).exists() and not (folder / d).is_symlink()]
        write_json(path, {"format": "genret.train_run", "owner": OWNER, "folders": new})


# --------------------------------------------------------------------------------------------------- writes


@contextmanager
def overwrite_allowed(*paths: str | os.PathLike) -> Iterator[None]:
    """Within the block, :func:`atomic_dir` may replace the genret files of these folders even where they hold
    other files (kept) or another kind of artefact (``--overwrite``)."""
    added = {Path(p).resolve() for p in paths} - _OVERWRITE
    _OVERWRITE.update(added)
    try:
        yield
    finally:
        _OVERWRITE.difference_update(added)


def check_output_dir(path: str | os.PathLike, formats: tuple[str, ...] = (), *, inputs=(), what: str = "output") -> Path:
    """Refuse an output folder that writing would damage; nothing is created or removed here.

    Refused whatever ``--overwrite`` says: a file, a symbolic link, the working folder or a folder above it,
    and a folder that is, or holds, one of ``inputs``. Refused unless :func:`overwrite_allowed`: a folder that
    holds files its manifest does not list (the user's: they would be kept, but the user did not say to write
    beside them), or an artefact of a kind not in ``formats``.

    Raises:
        OutputError: naming the path and what to do.
    """
    path = Path(path)
    resolved = path.resolve()
    if path.is_symlink():
        raise OutputError(f"{path} is a symbolic link: name the folder itself ({os.readlink(path)}) or a new one "
                          f"for the {what} (nothing was written)")
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
        if inp in resolved.parents and inp.is_dir() and artefact_format(inp) is not None:
            raise OutputError(f"{path} is inside an input of this command ({given}, a saved genret artefact): writing "
                              f"the {what} there would change it; name a folder outside it (nothing was written)")
    if path.is_dir() and any(path.iterdir()) and resolved not in _OVERWRITE:
        found = artefact_format(path)
        foreign = foreign_files(path)
        if foreign:
            kind = f"a {found!r} artefact" if found else "not a genret artefact"
            legacy = " (saved by an earlier genret: its manifest lists no files)" if found and not owned_files(path) else ""
            raise OutputError(f"{path} exists and is {kind}{legacy} with {len(foreign)} files genret did not write "
                              f"there (e.g. {foreign[0]!r}): name a new folder for the {what}, or pass --overwrite to "
                              "replace genret's files and keep the others (nothing was written)")
        if formats and found is not None and found not in formats:
            raise OutputError(f"{path} exists and is a {found!r} artefact, not a {' or '.join(map(repr, formats))} "
                              f"one: name a new folder for the {what}, or pass --overwrite to replace it "
                              "(nothing was written)")
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike, formats: tuple[str, ...] = (), manifest: str | None = None) -> Iterator[Path]:
    """Yield a new temporary folder beside ``path``; on success it is sealed and takes ``path``'s place.

    The block fills the folder, manifest included (``manifest`` names its file when it is not the usual one);
    on leaving it the manifest gets the list of every file (:func:`seal`) and the folder is exchanged with
    ``path`` atomically. Files of the old folder that its manifest does not list are kept: hard-linked into the
    new one first (a file of the same name written by the block wins). ``path`` must pass
    :func:`check_output_dir` for ``formats``. A failure or a kill at any instant leaves the old folder as it was.
    """
    path = Path(path)
    check_output_dir(path, formats)
    with _swapped_in(path, manifest) as tmp:
        yield tmp


@contextmanager
def atomic_update(path: str | os.PathLike, formats: tuple[str, ...], manifest: str | None = None) -> Iterator[Path]:
    """Change a saved artefact as a whole: yield a new folder holding (hard links to) its files, to be changed by
    writing files anew (:func:`write_json`: never in place); on leaving it is sealed and swapped in as
    :func:`atomic_dir` does. The user's files beside it are kept.

    Raises:
        ManifestError: ``path`` is not a saved artefact of one of ``formats``.
    """
    path = Path(path)
    found = artefact_format(path) if path.is_dir() else None
    if found not in formats:
        raise ManifestError(f"{path}: not a saved genret {' or '.join(formats)} (found {found!r})")
    with _swapped_in(path, manifest) as tmp:
        for rel in sorted(owned_files(path)):
            _link(path / rel, tmp / rel)
        yield tmp


@contextmanager
def _swapped_in(path: Path, manifest: str | None) -> Iterator[Path]:
    _check_writable(path)
    _recover(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes owner-only folders
    keep_tmp = False
    try:
        yield tmp
        seal(tmp, manifest)
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise OutputError(f"{path} became a link or a file while it was written; nothing was replaced")
        owned, kept = (owned_files(path), _keep_foreign(path, tmp)) if path.is_dir() else (set(), [])
        try:
            _swap(tmp, path)
        except OSError as err:
            raise _KeptNew(f"{path}: cannot be replaced ({err.strerror}); the new artefact is complete at {tmp}: "
                           "move it into place yourself") from None
        if owned or kept:
            _retire(tmp, path, owned, kept)
    except _KeptNew:
        keep_tmp = True  # the finished work stays where the message says
        raise
    finally:
        if not keep_tmp and (tmp.exists() or tmp.is_symlink()):
            shutil.rmtree(tmp, ignore_errors=True)  # ours: the unfinished new folder, or what is left of the old one


def _check_writable(path: Path) -> None:
    """Refuse before any work a place the swap cannot write: a parent folder that is not writable, an output on
    another filesystem than its parent or a mount point (no rename can replace it)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable: genret cannot write {path.name} there (nothing was written)")
    if path.is_dir() and (os.path.ismount(path) or path.stat().st_dev != path.parent.stat().st_dev):
        raise OutputError(f"{path} is a mount point (or on another filesystem than its folder), which no rename can "
                          f"replace: name a folder inside it, e.g. {path / 'out'} (nothing was written)")


def _keep_foreign(old: Path, new: Path) -> list[str]:
    """Hard-link (copy where links are refused) the user's entries of ``old`` into ``new`` at the same names, their
    folders made with the same permissions; returns their names.

    Raises:
        OutputError: a user's entry has the name of one the new artefact holds (genret never replaces the user's
            file; the new artefact is kept at its temporary name).
    """
    foreign = foreign_files(old)
    clash = [rel for rel in foreign if (new / rel.rstrip("/")).exists() or _file_above(new, rel)]
    if clash and _legacy(old):  # saved by a genret before file lists: its files of the new one's names are its own
        foreign = [rel for rel in foreign if rel not in clash]
        clash = []
    if clash:
        raise _KeptNew(f"{old} already holds your {clash[0]!r} ({len(clash)} such), where the new artefact has a "
                          f"file of that name: move yours out and write again; the new artefact is complete at {new}")
    for rel in foreign:
        src, dst = old / rel.rstrip("/"), new / rel.rstrip("/")
        for folder in reversed([*Path(rel.rstrip("/")).parents][:-1]):  # the user's folders, with their permissions
            if not (new / folder).exists():
                (new / folder).mkdir()
                shutil.copystat(old / folder, new / folder)
        if rel.endswith("/"):
            dst.mkdir()
            shutil.copystat(src, dst)
        else:
            _link(src, dst)
    return foreign


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (a copy where links are refused): the same file, untouched."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif stat.S_ISREG(src.lstat().st_mode):
            try:
                shutil.copy2(src, dst)
            except OSError as err:
                raise _KeptNew(f"{src}: cannot be kept beside the new artefact ({err.strerror}); move it out of "
                               f"{src.parent} and write again") from None
        else:
            raise _KeptNew(f"{src}: cannot be kept beside the new artefact (not a regular file); move it out of "
                           f"{src.parent} and write again") from None


def _legacy(folder: Path) -> bool:
    """Whether ``folder`` is a genret artefact saved before manifests listed files (one of its kind, by format)."""
    path = manifest_file(folder)
    manifest = _parse(path) if path is not None else None
    return (manifest is not None and str(manifest.get("format", "")).startswith("genret.")
            and not any(key in manifest for key in ("files", "owner", "digest")))


def _file_above(new: Path, rel: str) -> bool:
    """Whether a folder on the way to ``rel`` is a file in ``new`` (the user's ``a/b`` where genret writes ``a``)."""
    return any((new / folder).is_file() for folder in Path(rel.rstrip("/")).parents if str(folder) != ".")


def _retire(old: Path, path: Path, owned: set[str], kept: list[str]) -> None:
    """Empty the old folder (swapped out to ``old``): its genret files and the user's (kept in the new one by
    link) go; anything else (made while the new one was written) moves to the new folder."""
    for rel in owned | set(kept):
        target = old / rel.rstrip("/")
        if target.is_file() or target.is_symlink():
            target.unlink()
    for rel, entry in list(_walk(old)):
        dest = path / rel
        if not dest.exists() and not dest.is_symlink():
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(entry, dest)
        else:  # an older genret's file of a name the new artefact writes
            logger.debug("%s: replaced by the new %s", rel, path)


def _recover(path: Path) -> None:
    """Put back the old folder a two-rename swap (no atomic exchange on this system) left aside when it was cut off
    between its renames: ``path`` missing and one ``.NAME.genret-old-*`` (a name only genret makes) beside it."""
    if path.exists() or path.is_symlink() or not path.parent.is_dir():
        return
    aside = [d for d in sorted(path.parent.glob(f".{path.name}{TMP_MARK}old-*"))
             if d.is_dir() and not d.is_symlink() and any(d.iterdir())]
    if len(aside) > 1:
        raise OutputError(f"{path} is missing and {len(aside)} folders a cut-off write set aside are beside it "
                          f"({', '.join(d.name for d in aside)}): rename the one you want back to {path.name} "
                          "(nothing was written)")
    if aside:
        os.rename(aside[0], path)
        logger.warning("%s: put back from %s, where a write cut off mid-swap had left it", path, aside[0].name)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    libc = _libc()
    fn = getattr(libc, "renameat2", None) if libc is not None else None
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def _swap(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``; the old folder, if any, ends at ``new``'s (temporary) name."""
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):
        return
    # No atomic exchange here: two renames; between them the old folder is at a unique name (logged) until moved back.
    aside = path.with_name(f".{path.name}{TMP_MARK}old-{uuid.uuid4().hex[:12]}")  # a name only genret makes
    os.rename(path, aside)
    logger.debug("%s moved aside to %s for the swap", path, aside)
    try:
        os.rename(new, path)
    except OSError:
        os.rename(aside, path)
        raise
    os.rename(aside, new)


def remove_artefact(folder: str | os.PathLike) -> None:
    """Remove what genret wrote in ``folder`` (the files its manifest lists, as listed, and the manifest); other
    files stay, and a folder that is a symbolic link is left alone."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return
    foreign = foreign_files(folder)
    for rel in sorted(owned_files(folder), reverse=True):
        (folder / rel).unlink(missing_ok=True)
    for root, _dirs, _files in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        if not os.listdir(root) and (Path(root) == folder or Path(root).relative_to(folder).as_posix() + "/"
                                     not in foreign):
            os.rmdir(root)
