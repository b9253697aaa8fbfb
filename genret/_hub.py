"""Model references: a Hugging Face model id or a local directory, with clear errors offline."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def hub_offline() -> bool:
    """Whether Hugging Face hub downloads are turned off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_ref(ref: str | os.PathLike, what: str = "model") -> str:
    """Return ``ref`` as a string after checking that it can be loaded.

    A path-like reference (absolute, ``./``, ``../``, or existing) must be a directory; a hub id is
    refused at once when hub downloads are off, instead of failing deep inside ``from_pretrained``.
    """
    ref = str(ref)
    path = Path(ref).expanduser()
    looks_local = path.is_absolute() or ref.startswith((".", "~")) or path.exists() or ref.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise FileNotFoundError(f"{what} directory not found: {ref}")
        return str(path)
    if hub_offline():
        raise FileNotFoundError(
            f"{what} {ref!r} is not a local directory, and Hugging Face hub downloads are off "
            "(HF_HUB_OFFLINE=1); pass a local model directory, or allow downloads"
        )
    return ref


def model_fingerprint(ref: str, commit_hash: str | None = None) -> str:
    """A short id of a model's weights: the hub commit, or a hash of a local directory's files.

    For a local directory it hashes config.json and, for each weights file, its name, size and
    the first and last MiB: cheap for multi-GB checkpoints, and it changes when the weights do.
    """
    path = Path(ref)
    if not path.is_dir():
        return commit_hash or "unknown"
    h = hashlib.sha1()
    for f in sorted(path.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            size = f.stat().st_size
            h.update(f"{f.name}:{size}".encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return h.hexdigest()[:16]
