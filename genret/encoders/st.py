"""Dual encoders through sentence-transformers (its CLIP models encode both images and texts)."""

from __future__ import annotations

import numpy as np

from genret._hub import check_model_ref, model_fingerprint
from genret.encoders.base import DualEncoder
from genret.encoders.cache import EmbeddingCache
from genret.encoders.hf import default_device


class SentenceTransformerEncoder(DualEncoder):
    """A ``SentenceTransformer`` that accepts images and texts (for example ``clip-ViT-B-32``).

    Args:
        model: a model id or local directory that sentence-transformers can load.
        device: default the GPU when there is one.
        cache: an optional :class:`EmbeddingCache`.
        trust_remote_code: off by default.
    """

    backend = "sentence-transformers"

    def __init__(self, model: str, device: str | None = None, cache: EmbeddingCache | None = None,
                 trust_remote_code: bool = False) -> None:
        from sentence_transformers import SentenceTransformer

        ref = check_model_ref(model, "encoder model")
        try:
            self.model = SentenceTransformer(ref, device=device or default_device(), trust_remote_code=trust_remote_code)
        except OSError as err:
            raise FileNotFoundError(f"could not load sentence-transformers model {model!r}: {err}") from None
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            dim = int(self.model.encode(["a"], convert_to_numpy=True).shape[1])
        super().__init__(str(model), model_fingerprint(ref), int(dim), cache)

    def _embed_images(self, images: list) -> np.ndarray:
        return self.model.encode(images, batch_size=len(images), convert_to_numpy=True, show_progress_bar=False)

    def _embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
