"""Model references: a Hugging Face model id or a local directory, with clear errors offline."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def hub_offline() -> bool:
    """Whether Hugging Face hub downloads are turned off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_local(ref: str, base: str | os.PathLike = ".") -> bool:
    """Whether ``ref`` reads as a local path, relative to ``base``, rather than a hub id (``org/name``): absolute,
    ``./``, ``../``, ``~``, a backslash, more than one ``/``, an existing path, or one under an existing folder
    (``runs/clip`` where ``runs/`` exists)."""
    path = Path(ref).expanduser()
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1 or "\\" in ref:
        return True
    base = Path(base)
    return (base / path).exists() or (len(path.parts) > 1 and (base / path.parts[0]).is_dir())


def check_model_ref(ref: str | os.PathLike, what: str = "model", files: bool = True) -> str:
    """Return ``ref`` as a string after checking that it can be loaded.

    A path-like reference (absolute, ``./``, ``../``, an existing path, or one under an existing folder such as
    ``runs/clip``) must be a directory. A hub id in the local Hugging Face cache passes, downloads on or off
    (``HF_HUB_OFFLINE=1``: transformers loads it from there). One that is not there is refused at once, naming
    both readings, when hub downloads are off or the hub cannot be reached, instead of failing after half a
    minute of retries deep inside ``from_pretrained``. With ``files`` a local directory's files are checked
    against its manifest too (every safetensors file read whole); without, only that it is there.
    """
    ref = str(ref)
    path = Path(ref).expanduser()
    under_local = len(path.parts) > 1 and Path(path.parts[0]).is_dir()
    if looks_local(ref):
        if not path.is_dir():
            where = f" ({path.parts[0]}/ exists, {ref} does not)" if under_local and not path.exists() else ""
            raise FileNotFoundError(f"{what} directory not found: {ref}{where}")
        if files:
            from genret._io import check_local_model

            check_local_model(path, what)
        return str(path)
    cached = hub_snapshot(ref) is not None
    if hub_offline() and not cached:  # transformers loads a cached model offline: so does genret
        raise FileNotFoundError(
            f"{what} {ref!r} is not a local directory (no such path here), and Hugging Face hub downloads are off "
            f"(HF_HUB_OFFLINE=1) and it is not in the Hugging Face cache ({hub_cache()}); pass a local model "
            "directory, download it into the cache first, or allow downloads"
        )
    if not cached and not hub_reachable():
        raise FileNotFoundError(
            f"{what} {ref!r} is not a local directory (no such path here), is not in the Hugging Face cache, and the "
            "hub cannot be reached from this machine; pass a local model directory, or check the name and the network"
        )
    return ref


_REACHABLE: dict[str, bool] = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub's endpoint accepts a connection (asked once per process, ``timeout`` seconds)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    if host not in _REACHABLE:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            _REACHABLE[host] = True
        except OSError:
            _REACHABLE[host] = False
    return _REACHABLE[host]


def hub_cache() -> Path:
    """The Hugging Face hub cache folder (``HF_HUB_CACHE``, else ``HF_HOME/hub``, as ``huggingface_hub`` reads them)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_snapshot(ref: str, revision: str = "main") -> Path | None:
    """The local snapshot folder of hub repository ``ref`` in the Hugging Face cache, if it has been downloaded.

    The cache's layout: ``models--org--name/refs/<revision>`` names a commit, ``snapshots/<commit>/`` holds its
    files (links to ``blobs/``). Any repository: a model's, an adapter's (no ``config.json``), a
    sentence-transformers model's.
    """
    try:
        from huggingface_hub.file_download import repo_folder_name

        repo = hub_cache() / repo_folder_name(repo_id=ref, repo_type="model")
        pointer = repo / "refs" / revision
        commit = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else revision
        snapshot = repo / "snapshots" / commit
        return snapshot if commit and snapshot.is_dir() and any(snapshot.iterdir()) else None
    except (ImportError, OSError, ValueError):
        return None


class NotDownloaded(ValueError):
    """A hub model whose snapshot in the cache lacks its weights (only its config was fetched, so far)."""


FINGERPRINT = "files-v2"
"""The scheme of :func:`model_fingerprint`, its prefix (older genret keyed a hub model by its commit)."""

# Files of a model repository that do not change what genret computes with it: documentation, licences, model-card
# images, the formats other runtimes load (ONNX, GGUF, Core ML, TF, Flax, Meta's original/ weights), download
# bookkeeping, and genret's own manifests (they list the files, which are counted themselves).
_DOCS = ("readme", "license", "licence", "notice", "use_policy", "citation", ".gitattributes", ".gitignore")
_OTHER_SUFFIXES = frozenset((".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".pdf", ".gguf", ".onnx",
                             ".onnx_data", ".tflite", ".h5", ".msgpack", ".ot", ".mlmodel", ".mlpackage", ".pth"))
_OTHER_FOLDERS = frozenset((".cache", ".git", "onnx", "openvino", "original", "coreml", "gguf", "tf", "flax"))


def model_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a model folder (or hub snapshot) that make its outputs, relative to it.

    Everything but what :data:`_DOCS`, :data:`_OTHER_SUFFIXES` and :data:`_OTHER_FOLDERS` name: the config and
    generation config, the weights and their index, the tokenizer, the processor and its chat template, custom code,
    sentence-transformers' modules; ``.bin`` weights only in a folder without ``.safetensors`` (transformers prefers
    those). Sorted, so the same files give the same list wherever the folder is.
    """
    from genret._io import MANIFEST_NAMES

    folder = Path(folder)
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        name = rel.name.lower()
        if (not path.is_file() or rel.parts[0] in _OTHER_FOLDERS or path.suffix.lower() in _OTHER_SUFFIXES
                or name.startswith(_DOCS) or (len(rel.parts) == 1 and rel.name in MANIFEST_NAMES)):
            continue
        if path.suffix == ".bin" and any(path.parent.glob("*.safetensors")):
            continue
        found.append(rel)
    return found


def model_fingerprint(ref: str) -> str:
    """A short id of what a model is: a hash of its files' contents (:func:`model_files`), wherever they are.

    A local folder and a hub model in the Hugging Face cache are read alike, so a model is known by its files, not
    by its name or commit: a new commit that changes only the README keeps the key, a local copy of a snapshot has
    the snapshot's, and new weights, config, tokenizer, processor or chat template give a new one. Every adapter,
    index, feature cache and text cache is keyed by it. Cheap for multi-GB weights: a file over 8 MiB is hashed by
    its size and sampled blocks, at least 16 and one per 16 MiB (:func:`genret._io.fingerprint`), remembered per
    process.

    Raises:
        ValueError: a hub id whose files are not in the local cache (nothing could tell two versions apart);
            :class:`NotDownloaded` where only some are (its config, before the weights are fetched).
    """
    from genret._io import cached_fingerprint

    path = Path(ref).expanduser()
    folder = path if path.is_dir() else hub_snapshot(ref)
    if folder is None:
        raise ValueError(f"cannot fingerprint {ref!r}: it is neither a local directory nor in the Hugging Face cache; "
                         "load it once (from_pretrained) or pass a local directory")
    files = model_files(folder)
    if folder is not path and not _weights_present(folder, files):
        raise NotDownloaded(f"cannot fingerprint {ref!r} yet: its weights are not in the Hugging Face cache "
                            f"({folder}); they are fetched as it loads")
    if not files:
        raise ValueError(f"cannot fingerprint {ref!r}: {folder} holds no model files")
    h = hashlib.sha256()
    for rel in files:
        size = (folder / rel).stat().st_size
        digest = cached_fingerprint(folder / rel, samples=max(16, size >> 24))
        h.update(f"{rel.as_posix()}\0{digest}\n".encode())
    return f"{FINGERPRINT}:{h.hexdigest()[:24]}"


def _weights_present(folder: Path, files: list[Path]) -> bool:
    """Whether a snapshot holds its weights: every shard its index names, else some weights file."""
    import json

    indexes = [f for f in files if f.name.endswith(".index.json")]
    for index in indexes:
        try:
            shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        if not all((folder / index.parent / shard).is_file() for shard in shards):
            return False
    return bool(indexes) or any(f.suffix in (".safetensors", ".bin") for f in files)


def fingerprints_match(saved: str, current: str, ref: str) -> bool:
    """Whether an artefact keyed by fingerprint ``saved`` was made by the model ``ref`` whose fingerprint is ``current``.

    An artefact made before genret keyed models by their files carries the old key (a hub model's
    ``"<id>@<commit>"``, a local folder's hash of its config and weights' ends): it matches where the old rule
    still gives that key for ``ref`` (the same commit in the cache, the same folder), so nothing has to be remade;
    anything else does not (then the artefact's own check says what to remake).
    """
    if saved == current:
        return True
    if not saved or all(part.startswith(FINGERPRINT + ":") for part in saved.split("+")):
        return False
    try:
        return saved == legacy_fingerprint(ref)
    except ValueError:
        return False


def legacy_note(saved: str) -> str:
    """For an error about an artefact keyed by ``saved``: why an old-style key no longer matches, else nothing."""
    if not saved or all(part.startswith(FINGERPRINT + ":") for part in saved.split("+")):
        return ""
    return (f" (the fingerprint {saved!r} is an older genret's: it keyed a hub model by its commit and a folder by "
            "its weights' ends; it matches only while that commit, or that folder, is what loads)")


def legacy_fingerprint(ref: str) -> str:
    """The key genret gave a model before :data:`FINGERPRINT`: a hub model's ``"<id>@<commit>"`` (the cached
    snapshot's), a local folder's SHA-1 of its config.json and each weights file's name, size and first and last MiB.
    Only for :func:`fingerprints_match`."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return _hash_dir(path)
    snapshot = hub_snapshot(ref)
    if snapshot is None:
        raise ValueError(f"{ref!r} is not in the Hugging Face cache")
    return f"{ref}@{snapshot.name}"


def _hash_dir(path: Path) -> str:
    h = hashlib.sha1()
    for f in sorted(path.iterdir()):
        if f.name in ("config.json", "model.safetensors.index.json") or f.suffix in (".safetensors", ".bin"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:16]
