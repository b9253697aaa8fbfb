"""The dual-encoder contract: images and texts into one L2-normalised float32 space, batched and cached."""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from typing import Callable, Sequence, TypeVar

import numpy as np
from tqdm.auto import tqdm

from genret.data.images import ImageLike, image_key, load_image
from genret.encoders.cache import EmbeddingCache

logger = logging.getLogger(__name__)
T = TypeVar("T")


class DualEncoder(ABC):
    """Encodes images and texts into a shared space.

    Subclasses implement :meth:`_embed_images` and :meth:`_embed_texts` on one batch; this class does
    batching, progress, normalisation and the optional on-disk cache.

    Attributes:
        model_id: the model reference it was loaded from (hub id or directory).
        revision: a fingerprint of the weights, part of every cache key and index manifest.
        dim: the embedding dimension.
        backend: the registered backend name.
    """

    backend: str = ""

    def __init__(self, model_id: str, revision: str, dim: int, cache: EmbeddingCache | None = None) -> None:
        self.model_id = model_id
        self.revision = revision
        self.dim = dim
        self.cache = cache

    @property
    def cache_namespace(self) -> str:
        """The cache folder of this model: backend and the fingerprint of its files (not its name: a hub model and
        a local copy of it share their embeddings; :func:`genret._hub.model_fingerprint`)."""
        return hashlib.sha1(f"{self.backend}|{self.revision}".encode()).hexdigest()[:16]

    def namespace_for(self, role: str | None) -> str:
        """The cache folder of what this encoder makes for ``role``; one for both roles unless the encoder has roles."""
        return self.cache_namespace

    def _role_kwargs(self, role: str | None) -> dict:
        """What ``_embed_*`` is told about the role; nothing for an encoder that embeds queries as documents."""
        if role not in (None, "query", "document"):
            raise ValueError(f"role must be 'query' or 'document', got {role!r}")
        return {}

    def describe(self) -> dict:
        """What an index manifest records about this encoder."""
        return {"backend": self.backend, "model": self.model_id, "revision": self.revision, "dim": self.dim}

    @abstractmethod
    def _embed_images(self, images: list) -> np.ndarray:
        """Embed one batch of RGB PIL images (not normalised)."""

    @abstractmethod
    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed one batch of texts (not normalised)."""

    def encode_images(
        self, images: Sequence[ImageLike], batch_size: int = 64, progress: bool = False, role: str | None = None
    ) -> np.ndarray:
        """Embed images (paths or PIL images) into an ``(n, dim)`` float32 array of unit rows.

        Args:
            role: ``query`` or ``document``: an instructed embedder (:mod:`genret.encoders.mllm`) embeds each with
                its own instruction and needs it; CLIP-like encoders embed both alike.

        Raises:
            genret.data.ImageLoadError: naming the file, when an image is missing or unreadable.
        """
        kwargs = self._role_kwargs(role)
        keys = [image_key(im) for im in images] if self.cache is not None else None
        return self._encode(list(images), keys, lambda b: self._embed_images([load_image(x) for x in b], **kwargs),
                            batch_size, progress, "images", role)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False,
                     role: str | None = None) -> np.ndarray:
        """Embed texts into an ``(n, dim)`` float32 array of unit rows (``role`` as for :meth:`encode_images`)."""
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(f"text {i} is {'empty' if isinstance(t, str) else type(t).__name__}: {t!r}")
        kwargs = self._role_kwargs(role)
        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts] if self.cache is not None else None
        return self._encode(list(texts), keys, lambda b: self._embed_texts(b, **kwargs), batch_size, progress,
                            "texts", role)

    def _encode(self, inputs: list[T], keys: list[str] | None, embed: Callable[[list[T]], np.ndarray],
                batch_size: int, progress: bool, what: str, role: str | None = None) -> np.ndarray:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        namespace = self.namespace_for(role)
        out = np.zeros((len(inputs), self.dim), dtype=np.float32)
        todo = list(range(len(inputs)))
        if keys is not None and self.cache is not None:
            found = self.cache.get(namespace, keys)
            for i, vec in found.items():
                out[i] = vec
            todo = [i for i in todo if i not in found]
            if found:
                logger.info("embedding cache: %d of %d %s already encoded", len(found), len(inputs), what)
        bar = tqdm(total=len(todo), desc=f"encode {what}", unit=what[:-1], disable=not progress or not todo)
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            vecs = np.asarray(embed([inputs[i] for i in idx]), dtype=np.float32)
            out[idx] = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
            bar.update(len(idx))
        bar.close()
        if keys is not None and self.cache is not None and todo:
            self.cache.put(namespace, [keys[i] for i in todo], out[todo])
        return out
