"""Dual encoders (CLIP, SigLIP, sentence-transformers, MLLM embedders) behind one contract, with an embedding cache."""

from __future__ import annotations

from genret.encoders.base import DualEncoder
from genret.encoders.cache import EmbeddingCache
from genret.registry import Registry

ENCODERS: Registry = Registry("encoder backend")


@ENCODERS.register("hf")
def _hf(model: str, **kwargs) -> DualEncoder:
    from genret.encoders.hf import HFDualEncoder

    return HFDualEncoder(model, **kwargs)


@ENCODERS.register("sentence-transformers")
def _st(model: str, **kwargs) -> DualEncoder:
    from genret.encoders.st import SentenceTransformerEncoder

    kwargs.pop("dtype", None)
    return SentenceTransformerEncoder(model, **kwargs)


@ENCODERS.register("mllm")
def _mllm(model: str, **kwargs) -> DualEncoder:
    from genret.encoders.mllm import MLLMEmbedder

    return MLLMEmbedder(model, **kwargs)


def load_encoder(backend: str, model: str, **kwargs) -> DualEncoder:
    """Load a dual encoder by backend name (``hf``, ``sentence-transformers`` or ``mllm``) and model reference."""
    return ENCODERS.get(backend)(model, **kwargs)


__all__ = ["DualEncoder", "EmbeddingCache", "ENCODERS", "load_encoder"]
