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
    ``runs/clip``) must be a directory. A hub id is refused at once, naming both readings, when hub downloads
    are off or the hub cannot be reached and the model is not in the local cache, instead of failing after
    half a minute of retries deep inside ``from_pretrained``. With ``files`` a local directory's files are checked
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
    if hub_offline():
        raise FileNotFoundError(
            f"{what} {ref!r} is not a local directory (no such path here), and Hugging Face hub downloads are off "
            "(HF_HUB_OFFLINE=1); pass a local model directory, or allow downloads"
        )
    if hub_snapshot(ref) is None and not hub_reachable():
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


def hub_snapshot(ref: str) -> Path | None:
    """The local snapshot folder of hub model ``ref`` in the Hugging Face cache, if it has been downloaded.

    Its name is the commit of the files it holds (``.../models--org--name/snapshots/<commit>/``).
    """
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None
    found = try_to_load_from_cache(repo_id=ref, filename="config.json")
    return Path(found).parent if isinstance(found, str) else None


def model_fingerprint(ref: str, commit_hash: str | None = None) -> str:
    """A short id of a model's weights: a hash of a local directory's files, or a hub model's commit.

    For a local directory it hashes config.json and, for each weights file, its name, size and
    the first and last MiB: cheap for multi-GB checkpoints, and it changes when the weights do.
    For a hub id it is ``"<id>@<commit>"``, the commit of the snapshot in the Hugging Face cache
    (transformers 5 no longer sets ``config._commit_hash``), else of ``commit_hash``: the id is part
    of it, so two hub models never share a fingerprint, and every cache keyed by it tells them apart.

    Raises:
        ValueError: a hub id whose files are not in the local cache and no ``commit_hash`` is given:
            nothing could tell two revisions apart, so caches keyed by it would mix them.
    """
    path = Path(ref)
    if path.is_dir():
        return _hash_dir(path)
    snapshot = hub_snapshot(ref)
    if snapshot is not None:
        return f"{ref}@{snapshot.name}"
    if commit_hash:
        return f"{ref}@{commit_hash}"
    raise ValueError(f"cannot fingerprint {ref!r}: it is neither a local directory nor in the Hugging Face cache; "
                     "load it once (from_pretrained) or pass a local directory")


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
