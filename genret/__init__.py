"""genret: image-text retrieval with multimodal LLMs.

A dual-encoder prefilter on a faiss index proposes candidates; later stages rerank them, rewrite the
query or generate identifiers. :class:`~genret.pipeline.RetrievalPipeline` ties the stages together.
"""

from genret.types import Candidate, Item, Query, Ranking

__version__ = "0.1.0"

__all__ = ["Candidate", "Item", "Query", "Ranking", "__version__"]
