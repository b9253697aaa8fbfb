"""The dual-encoder prefilter: top-k from the faiss index of the query's target modality."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from genret.config import at_least, check_fields
from genret.stages.base import STAGES, RankStage, StageContext
from genret.types import Candidate, Query, Ranking


@dataclass
class PrefilterConfig:
    """Settings of the prefilter stage."""

    k: int = field(default=100, metadata={"range": at_least(1), "help": "candidates passed on to the next stage"})
    batch_size: int = field(default=256, metadata={"range": at_least(1), "help": "queries encoded per batch"})
    image_weight: float = field(default=1.0, metadata={"range": at_least(0),
                                                       "help": "image + text queries: unit(text) + w * unit(image)"})

    def __post_init__(self) -> None:
        check_fields(self)


def encode_queries(queries: Sequence[Query], ctx: StageContext, batch_size: int = 256,
                   image_weight: float = 1.0) -> np.ndarray:
    """Embed text queries with the text tower and image queries with the image tower, in order (as queries: an
    instructed embedder uses its query instruction).

    An image + text query (a composed query, or a rewrite that keeps its reference) is the late fusion
    of both, the usual "image + text" baseline of composed retrieval: unit(unit(text) + w · unit(image)); an
    MLLM embedder, which takes both in one input, embeds it jointly instead (``image_weight`` is then unused).
    """
    out = np.zeros((len(queries), ctx.encoder.dim), dtype=np.float32)
    text_rows = [i for i, q in enumerate(queries) if q.image is None]
    image_rows = [i for i, q in enumerate(queries) if q.image is not None]
    both = [i for i in image_rows if (queries[i].text or "").strip()]
    bad = [queries[i].id for i in text_rows if not queries[i].text and not queries[i].dialog]
    if bad:
        raise ValueError(f"queries without text or image: {bad[:5]}")
    if text_rows:
        texts = [queries[i].text or " ".join(queries[i].dialog) for i in text_rows]
        out[text_rows] = ctx.encoder.encode_texts(texts, batch_size=batch_size, role="query")
    if image_rows:
        out[image_rows] = ctx.encoder.encode_images([queries[i].image for i in image_rows], batch_size=64,
                                                    role="query")
    joint = getattr(ctx.encoder, "encode_pairs", None)
    if both and joint is not None:
        out[both] = joint([queries[i].image for i in both], [queries[i].text for i in both], role="query")
    elif both:
        text = ctx.encoder.encode_texts([queries[i].text for i in both], batch_size=batch_size, role="query")
        fused = _unit(text) + image_weight * _unit(out[both])
        out[both] = _unit(fused)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@STAGES.register("prefilter")
class PrefilterStage(RankStage):
    """Dual-encoder retrieval from the gallery's faiss index (both directions)."""

    config_class = PrefilterConfig

    def rank(self, queries: Sequence[Query], upstream: Sequence[Ranking] | None, ctx: StageContext,
             k: int | None = None) -> list[Ranking]:
        k = k or self.config.k
        vectors = encode_queries(queries, ctx, self.config.batch_size, self.config.image_weight)
        rankings: list[Ranking] = []
        for target in ("image", "text"):
            rows = [i for i, q in enumerate(queries) if q.target == target]
            if not rows:
                continue
            index = ctx.gallery.index(target)
            if upstream is not None:
                results = [self._score_given(index, vectors[i], upstream[i]) for i in rows]
            else:
                # The configured k is a budget: a gallery smaller than it is searched whole.
                scores, ids = index.search(vectors[rows], min(k, len(index)))
                results = [list(zip(ids[j], scores[j].tolist())) for j in range(len(rows))]
            for i, pairs in zip(rows, results):
                pairs = sorted(pairs, key=lambda p: -p[1])[:k]
                cands = tuple(Candidate(item_id=c, score=s, scores={self.name: s}) for c, s in pairs)
                rankings.append((i, Ranking(query=queries[i], candidates=cands, stage=self.name)))
        return [r for _, r in sorted(rankings, key=lambda p: p[0])]

    @staticmethod
    def _score_given(index, vector: np.ndarray, ranking: Ranking) -> list[tuple[str, float]]:
        ids = ranking.ids
        if not ids:
            return []
        return list(zip(ids, (index.reconstruct(ids) @ vector).tolist()))
