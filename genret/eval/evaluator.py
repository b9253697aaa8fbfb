"""Run a pipeline on a dataset split and measure every rank stage in both directions.

Protocol (Flickr30K / MS-COCO, Karpathy splits): the gallery is the split's images (for text→image)
and captions (for image→text); every caption is a text query whose one relevant item is its image;
every image is a query whose relevant items are its captions. Metrics are reported as percentages.

Where images carry ``twin_of`` (the miniature world's test split), each stage is also asked to choose
between an image and its twin for every caption of either (and between their captions for each
image): what a model that reads words as a bag cannot do.
"""

from __future__ import annotations

import logging
import platform
import time
from datetime import datetime, timezone
from typing import Sequence

from genret import __version__
from genret.config import to_dict
from genret.data.dataset import Dataset
from genret.eval.metrics import mrr, recall_at_k, recall_at_ks, rsum
from genret.pipeline import RetrievalPipeline
from genret.types import Candidate, Query, Ranking

logger = logging.getLogger(__name__)

DIRECTIONS = {"t2i": "text→image", "i2t": "image→text"}


def _percent(values: dict[str, float]) -> dict[str, float]:
    return {k: round(100.0 * v, 2) for k, v in values.items()}


CURVE_KS = (1, 2, 3, 5, 10, 20, 50, 100)


def _measure(rankings: Sequence[Ranking], relevant: Sequence[set[str]], ks: Sequence[int]) -> tuple[dict, dict]:
    """R@K and MRR (percent), and the recall curve over :data:`CURVE_KS` up to the ranking length."""
    ids = [r.ids for r in rankings]
    metrics = recall_at_ks(ids, relevant, ks)
    metrics["MRR"] = mrr(ids, relevant)
    depth = max((len(x) for x in ids), default=0)
    curve = {str(k): recall_at_k(ids, relevant, k) for k in CURVE_KS if k <= depth}
    return _percent(metrics), _percent(curve)


def twin_pairs(dataset: Dataset) -> list[tuple[str, str]]:
    """The (image, twin) id pairs of a dataset whose records carry ``twin_of``, each pair once."""
    ids = {r.id for r in dataset.records}
    pairs = set()
    for r in dataset.records:
        twin = r.meta.get("twin_of")
        if twin is not None and str(twin) in ids:
            pairs.add(tuple(sorted((r.id, str(twin)))))
    return sorted(pairs)


def twin_queries(dataset: Dataset, pairs: list[tuple[str, str]], directions: Sequence[str]):
    """The twin check's queries: per direction, ``(queries, upstream, correct)`` where each query's upstream ranking
    holds its image and the twin (t2i), or both images' captions (i2t), and ``correct`` the right ids; empty
    without pairs."""
    records = dataset.by_id()
    both = [(a, b) for a, b in pairs] + [(b, a) for a, b in pairs]
    out = {}
    if not pairs:
        return out
    if "t2i" in directions:
        queries, cands, correct = [], [], []
        for own, twin in both:
            for cid, text in zip(records[own].caption_ids(), records[own].captions):
                queries.append(Query(id=cid, text=text, target="image"))
                cands.append([own, twin])
                correct.append({own})
        out["t2i"] = (queries, cands, correct)
    if "i2t" in directions:
        queries = [Query(id=own, image=str(records[own].path), target="text") for own, _ in both]
        cands = [records[own].caption_ids() + records[twin].caption_ids() for own, twin in both]
        out["i2t"] = (queries, cands, [set(records[own].caption_ids()) for own, _ in both])
    return {d: (q, [Ranking(query=x, candidates=tuple(Candidate(c, 0.0) for c in cs)) for x, cs in zip(q, c)], ok)
            for d, (q, c, ok) in out.items()}


def _twin_accuracy(pipe: RetrievalPipeline, dataset: Dataset, pairs: list[tuple[str, str]],
                   directions: Sequence[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    # A stage that retrieves over the whole gallery whatever it is handed cannot be asked to choose between two.
    chooses = {s.name for s in pipe.stages if getattr(s, "reranks_upstream", True)}
    for direction, (queries, upstream, correct) in twin_queries(dataset, pairs, directions).items():
        k = max(len(r.candidates) for r in upstream)
        for stage, rankings in pipe.run(queries, k=k, upstream=upstream):
            if stage not in chooses:
                continue
            hits = sum(bool(r.candidates) and r.candidates[0].item_id in ok for r, ok in zip(rankings, correct))
            out.setdefault(stage, {"pairs": len(pairs)})[direction] = round(100.0 * hits / len(queries), 2)
    return out


def evaluate(pipe: RetrievalPipeline, dataset: Dataset, split: str = "test", directions: Sequence[str] = ("t2i", "i2t"),
             ks: Sequence[int] = (1, 5, 10), progress: bool = True) -> dict:
    """Index the split as the gallery, run every query, and measure each rank stage.

    Args:
        pipe: the pipeline (its gallery is replaced by the split's, unless it already holds exactly it).
        dataset: the whole dataset; ``split`` picks the evaluation images.
        directions: ``t2i`` and/or ``i2t``.
        ks: the K of R@K.
        progress: show progress bars.

    Returns:
        The report: ``stages[name][direction]["R@1"]``... as percentages, ``stages[name]["RSUM"]``,
        ``twins`` (when the split has twins), ``timings``, ``config``, ``dataset``.
    """
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"direction must be one of {list(DIRECTIONS)}, got {d!r}")
    data = dataset.split(split)
    modalities = [{"t2i": "image", "i2t": "text"}[d] for d in directions]
    start = time.perf_counter()
    source = pipe.gallery.source
    if not (source.get("dataset") == str(data.source.resolve()) and source.get("splits") == sorted({r.split for r in data.records})
            and source.get("images") == len(data) and all(m in pipe.gallery.indexes for m in modalities)):
        pipe.index(data, modalities=modalities, progress=progress)
    index_seconds = time.perf_counter() - start
    pipe.timings.clear()
    stages: dict[str, dict] = {}
    curves: dict[str, dict] = {}
    counts: dict[str, int] = {}
    for direction in directions:
        queries, relevant = data.text_queries() if direction == "t2i" else data.image_queries()
        counts[direction] = len(queries)
        logger.info("%s: %d queries", DIRECTIONS[direction], len(queries))
        for stage, rankings in pipe.run(queries):
            stages.setdefault(stage, {})[direction], curves.setdefault(stage, {})[direction] = \
                _measure(rankings, relevant, ks)
    timings = {name: {"seconds": round(sec, 3), "ms_per_query": round(1000 * sec / max(1, sum(counts.values())), 3)}
               for name, sec in pipe.timings.items()}
    for metrics in stages.values():
        if "t2i" in metrics and "i2t" in metrics and all(f"R@{k}" in metrics["t2i"] for k in (1, 5, 10)):
            metrics["RSUM"] = round(rsum(metrics["t2i"], metrics["i2t"]), 2)
    report = {
        "genret": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline": pipe.config.name, "dataset": {"name": data.name, "source": str(data.source), "split": split,
                                                  "images": len(data), "queries": counts},
        "metrics_unit": "percent", "stages": stages, "recall_curves": curves,
        "timings": {"index_seconds": round(index_seconds, 3), "stages": timings},
        "config": to_dict(pipe.config), "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    pairs = twin_pairs(data)
    if pairs:
        report["twins"] = _twin_accuracy(pipe, data, pairs, directions)
    return report
