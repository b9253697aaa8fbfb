"""A persistent cache of generated text (rewrites, answers), keyed by what produced it.

Layout: ``<root>/<kind>/<namespace>/manifest.json`` (the key: the model files' fingerprint, adapters, prompt,
decoding settings) and ``shard-<uuid>.json`` files of ``{entry key: value}``. A namespace is the
hash of its key, so another model, adapter, prompt version or setting never sees these entries;
``manifest.json`` is checked on load. Each :meth:`TextCache.put` writes a new shard to a temporary
file and renames it: a crash loses at most the batch being written, never earlier ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from genret._io import ManifestError, read_json, write_json

if TYPE_CHECKING:
    from genret.mllm.backend import MLLM

logger = logging.getLogger(__name__)
FORMAT = "genret.text_cache"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_key(mllm: "MLLM") -> dict:
    """The model's identity for cache keys: its files' fingerprint (not its name: a local copy of a hub model shares
    the cache, :func:`genret._hub.model_fingerprint`), each active adapter's weights digest, and how its processor
    reads an image (:func:`image_key`)."""
    adapters = []
    for name in mllm.active_adapters:
        info = mllm.adapters.get(name, {})
        if "digest" not in info:
            weights = Path(info.get("path", "")) / "adapter_model.safetensors"
            info["digest"] = file_digest(weights) if weights.is_file() else f"unknown:{name}"
        adapters.append({"name": name, "task": info.get("task"), "digest": info["digest"]})
    return {"revision": mllm.revision, "adapters": adapters, "images": image_key(mllm)}


def image_key(mllm: "MLLM") -> str:
    """How the model's processor turns an image into tokens, as a digest: the processor's and its image processor's
    settings as they are now — the checkpoint's files, the user's ``processor_options`` as the family applied them,
    and what a family changed for cached features (SmolVLM's splitting turned off). Every cache of what is made from
    images (gallery features, captions, answers, rewrites) is keyed by it, so lowering ``max_pixels`` never serves
    what the old setting made."""
    processor = mllm.processor
    try:
        settings = processor.to_dict()
    except (AttributeError, TypeError, ValueError):  # a processor that cannot describe itself: its image part can
        settings = {"image_processor": processor.image_processor.to_dict()}
    settings.pop("chat_template", None)  # prompts are keyed by the caches themselves
    return _digest(json.loads(json.dumps(settings, sort_keys=True, default=str)))[:16]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class TextCache:
    """Entries under one key; ``root=None`` keeps them in memory only.

    Args:
        root: the cache folder (shared by every kind and key).
        kind: a subfolder per use, e.g. ``rewrites``.
        key: JSON-able identity of the producer (model, adapter, prompt, settings).
    """

    def __init__(self, root: str | os.PathLike | None, kind: str, key: Mapping[str, Any]) -> None:
        self.key = json.loads(json.dumps(dict(key)))
        self.folder = Path(root) / kind / _digest(self.key)[:24] if root is not None else None
        self.entries: dict[str, Any] = {}
        if self.folder is not None and self.folder.is_dir():
            self._load()

    def _load(self) -> None:
        manifest = self.folder / "manifest.json"
        if manifest.is_file():
            saved = read_json(manifest, what="text cache manifest")
            if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("key") != self.key:
                raise ManifestError(f"{manifest}: this cache folder belongs to another model, adapter, prompt or setting "
                                    "than its name says (edited or copied by hand?); remove the folder to rebuild it")
        for shard in sorted(self.folder.glob("shard-*.json")):
            data = read_json(shard, what="text cache shard")
            if not isinstance(data, dict):
                raise ManifestError(f"{shard}: not a cache shard (a JSON object of entries); remove it")
            self.entries.update(data)

    @staticmethod
    def entry_key(text: str) -> str:
        """The entry key of an input text (its sha256)."""
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, text: str) -> Any | None:
        """The cached value for ``text``, or ``None``."""
        return self.entries.get(self.entry_key(text))

    def put(self, values: Mapping[str, Any]) -> None:
        """Store ``{input text: value}`` (one new shard on disk)."""
        if not values:
            return
        new = {self.entry_key(t): v for t, v in values.items()}
        self.entries.update(new)
        if self.folder is None:
            return
        manifest = self.folder / "manifest.json"
        if not manifest.is_file():
            write_json(manifest, {"format": FORMAT, "key": self.key})
        write_json(self.folder / f"shard-{uuid.uuid4().hex}.json", new)

    def __len__(self) -> int:
        return len(self.entries)
