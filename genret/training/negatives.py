"""Hard negatives mined by the prefilter: a dual encoder's top-k non-matching candidates, both directions.

Text → image: every caption is a query; its image is the positive, the encoder's nearest other
images are the negatives. Image → text: every image is a query; its own captions are positives,
the nearest captions of other images the negatives. A candidate that carries the query's exact
words (a duplicate caption of another image) is not a negative: it would teach the wrong lesson.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from collections import Counter

import numpy as np

from genret.data.annotations import annotation_of
from genret.data.dataset import Dataset
from genret.encoders.base import DualEncoder
from genret.index.faiss_index import VectorIndex

logger = logging.getLogger(__name__)

DIRECTIONS = ("t2i", "i2t")


@dataclass(frozen=True)
class QueryGroup:
    """One training query with its positives and mined negatives.

    Indices refer to ``dataset.records`` (images) and to :func:`caption_table` (captions).

    Attributes:
        direction: ``t2i`` (the query is a caption, candidates are images) or ``i2t``.
        query: the caption index (t2i) or image index (i2t).
        positives: the matching candidates: the caption's image, or the image's captions.
        negatives: the prefilter's top non-matching candidates, nearest first.
    """

    direction: str
    query: int
    positives: tuple[int, ...]
    negatives: tuple[int, ...]


def caption_table(data: Dataset) -> tuple[list[str], list[int]]:
    """Every caption of ``data`` in order, and the index of the image each belongs to."""
    texts, owners = [], []
    for i, rec in enumerate(data.records):
        texts += rec.captions
        owners += [i] * len(rec.captions)
    return texts, owners


def mine_negatives(encoder: DualEncoder, data: Dataset, k: int, directions: Sequence[str] = DIRECTIONS,
                   batch_size: int = 64, progress: bool = False,
                   duplicate_threshold: float | None = None) -> tuple[list[QueryGroup], dict]:
    """The prefilter's top-``k`` non-matching candidates of every query of ``data``.

    Args:
        encoder: the prefilter's dual encoder.
        data: the training records.
        k: negatives kept per query (fewer when the data has fewer non-matching candidates).
        directions: ``t2i``, ``i2t`` or both.
        duplicate_threshold: false-negative filtering (U-MARVEL's): a mined candidate whose prefilter embedding
            has a cosine of at least this with the positive's (image with image for ``t2i``, caption with the
            nearest of the image's captions for ``i2t``) is dropped as a likely unlabelled match; ``None``
            keeps every non-matching candidate.

    Returns:
        The query groups, and statistics: per direction the prefilter's R@1 on these queries, the mean number
        of negatives kept and, with ``duplicate_threshold``, the share of candidates dropped as near-duplicates.
    """
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"directions must be among {DIRECTIONS}, got {unknown[0]!r}")
    texts, owners = caption_table(data)
    # t2i: captions are queries, images documents; i2t the other way round (an instructed embedder tells them apart)
    want = {"t2i": ("document", "query"), "i2t": ("query", "document")}
    images = embed_as(encoder, "image", [str(r.path) for r in data.records], [want[d][0] for d in directions],
                      batch_size=batch_size, progress=progress)
    captions = embed_as(encoder, "text", texts, [want[d][1] for d in directions], progress=progress)
    caption_sets = [set(r.captions) for r in data.records]
    keys = [content_key(r) for r in data.records]
    same = max(Counter(keys).values())  # the most images that show one thing: look that much deeper
    by_image: list[list[int]] = [[] for _ in data.records]
    for c, owner in enumerate(owners):
        by_image[owner].append(c)
    groups: list[QueryGroup] = []
    stats: dict = {}
    # Looking deeper where near-duplicates are dropped, so that k are still kept.
    deeper = 2 * k if duplicate_threshold is not None else 0

    def near_duplicate(vectors: np.ndarray, candidate: int, positives: Sequence[int]) -> bool:
        return duplicate_threshold is not None and max(_cosine(vectors[candidate], vectors[p])
                                                       for p in positives) >= duplicate_threshold

    if "t2i" in directions:
        ranked = top_k(images["document"], captions["query"], k + same + deeper)
        top1, kept, dropped = [], [], []
        for c, row in enumerate(ranked):
            positive = owners[c]
            negs = [i for i in row if keys[i] != keys[positive] and texts[c] not in caption_sets[i]]
            clean = [i for i in negs if not near_duplicate(images["document"], i, (positive,))]
            groups.append(QueryGroup("t2i", c, (positive,), tuple(clean[:k])))
            top1.append(row[0] == positive)
            kept.append(len(clean[:k]))
            dropped.append(1 - len(clean) / max(len(negs), 1))
        stats["t2i"] = _mining_stats(len(ranked), top1, kept, dropped, duplicate_threshold)
    if "i2t" in directions:
        most = max(len(r.captions) for r in data.records)
        ranked = top_k(captions["document"], images["query"], k + same * most + deeper)
        top1, kept, dropped = [], [], []
        for i, row in enumerate(ranked):
            negs = [c for c in row if keys[owners[c]] != keys[i] and texts[c] not in caption_sets[i]]
            clean = [c for c in negs if not near_duplicate(captions["document"], c, by_image[i])]
            groups.append(QueryGroup("i2t", i, tuple(by_image[i]), tuple(clean[:k])))
            top1.append(owners[row[0]] == i)
            kept.append(len(clean[:k]))
            dropped.append(1 - len(clean) / max(len(negs), 1))
        stats["i2t"] = _mining_stats(len(ranked), top1, kept, dropped, duplicate_threshold)
    return groups, stats


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _mining_stats(queries: int, top1: list, kept: list, dropped: list, threshold: float | None) -> dict:
    out = {"queries": queries, "prefilter_R@1": round(100 * float(np.mean(top1)), 2),
           "negatives": round(float(np.mean(kept)), 2)}
    if threshold is not None:
        out.update(duplicate_threshold=threshold, dropped_as_duplicates=round(100 * float(np.mean(dropped)), 2))
    return out


def embed_as(encoder: DualEncoder, kind: str, inputs: list, roles: Sequence[str], **kwargs) -> dict[str, np.ndarray]:
    """``inputs`` (texts or image paths, as ``kind`` says) embedded in each of ``roles`` (``query``, ``document``).

    Embedded once where the roles embed alike: a CLIP-like encoder, or an instructed embedder with one instruction
    for both (its cache namespace, keyed by everything that makes the vectors, is then one).
    """
    encode = encoder.encode_texts if kind == "text" else encoder.encode_images
    out: dict[str, np.ndarray] = {}
    for role in dict.fromkeys(roles):
        alike = next((r for r in out if encoder.namespace_for(r) == encoder.namespace_for(role)), None)
        out[role] = out[alike] if alike is not None else encode(inputs, role=role, **kwargs)
    return out


def content_key(record) -> object:
    """What a record shows, where the data set says: its annotation's signature (the miniature world's scene).

    Two training images of the same content are not negatives of each other (a "negative" that matches
    the query would teach the reranker the opposite of the truth); elsewhere each image is its own.
    A caption shared by two images also rules them out as each other's negatives (see above).
    """
    found = annotation_of(record.meta)
    if found:
        key, kind, value = found
        return (key, kind.signature(value))
    return ("id", record.id)


def top_k(gallery: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    """Row indices of each query's top-``k`` gallery vectors (exact inner product, faiss)."""
    index = VectorIndex(gallery.shape[1])
    index.add([str(i) for i in range(len(gallery))], gallery)
    _, ids = index.search(queries, min(k, len(gallery)))
    return [[int(i) for i in row] for row in ids]
