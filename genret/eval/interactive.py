"""Evaluate interactive retrieval round by round (ChatIR's protocol; EIIRwQR's loop fits the same driver).

Protocol: the gallery is the split's images; every image is one query's target. The query starts from a
*partial* description of it: in the miniature world one object of its scene ("a small red circle"), so
the dialog has something to add; elsewhere its first caption (as ChatIR). Round 0 retrieves with that
text; each later round the round stage updates every query (chat: asks one question, the simulated user
answers) and the rank stages retrieve again with it.

The first stage of the pipeline is a :class:`RoundStage`, the rest rank. The loop hands the round stage
the ground truth once (:meth:`RoundStage.start`) and, each round, the final rankings of the round before
(:meth:`RoundStage.next_round`): a chat stage ignores them; an EIIRwQR stage would have its simulated user
mark the relevant results among them, caption those and rewrite the query.

Report (metrics in percent): per rank stage and round, R@1/R@5/R@10 and ChatIR's cumulative Hits@K
(a query counts from the first round its target reached the top K); every dialog with the target's rank
per round; seconds per part (question, answer, summary, retrieve).
"""

from __future__ import annotations

import logging
import platform
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from tqdm.auto import tqdm

from genret import __version__
from genret.config import to_dict
from genret.eval.metrics import first_relevant_rank, hits_at_k_per_round, recall_at_ks
from genret.stages.base import RankStage, RoundStage
from genret.types import Query, Ranking

if TYPE_CHECKING:
    from genret.data.dataset import Dataset, ImageRecord
    from genret.pipeline import RetrievalPipeline
    from genret.stages.dialog import Target

logger = logging.getLogger(__name__)
KS = (1, 5, 10)
DIALOG_KEYS = ("initial", "turns", "rounds", "stopped", "summary", "summary_fallback")
"""What of a query's ``meta`` goes into the report's dialogs."""


def dialog_queries(records: Sequence["ImageRecord"], seed: int = 0) -> tuple[list[Query], list["Target"]]:
    """One query per image: its partial description (see the module docstring) and its target."""
    from genret.stages.dialog import Target, initial_query

    queries, truth = [], []
    for r in records:
        queries.append(Query(id=r.id, text=initial_query(r.meta, r.captions, r.id, seed), target="image"))
        truth.append(Target(id=r.id, image=str(r.path), meta=dict(r.meta) or None))
    return queries, truth


def _rank(pipe: "RetrievalPipeline", queries: list[Query]) -> list[tuple[str, list[Ranking]]]:
    ctx, upstream, out = pipe.context, None, []
    for stage in pipe.stages[1:]:
        upstream = stage.rank(queries, upstream, ctx)
        out.append((stage.name, upstream))
    return out


def _round_stage(pipe: "RetrievalPipeline") -> RoundStage:
    first = pipe.stages[0]
    if not isinstance(first, RoundStage):
        raise ValueError(f"pipeline {pipe.config.name!r}: the first stage ({first.name!r}, "
                         f"{type(first).__name__}) must be a round stage such as 'chat'")
    later = [s.name for s in pipe.stages[1:] if not isinstance(s, RankStage)]
    if later or len(pipe.stages) < 2:
        raise ValueError(f"pipeline {pipe.config.name!r}: after {first.name!r} every stage must rank "
                         f"(a prefilter, maybe a rerank); {', '.join(later) or 'none given'}")
    return first


def evaluate_dialog(pipe: "RetrievalPipeline", dataset: "Dataset", split: str = "test", rounds: int | None = None,
                    k: int = 10, limit: int | None = None, progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Index the split's images, then retrieve each image from a dialog, round by round.

    Args:
        pipe: a pipeline whose first stage is a :class:`RoundStage` (``chat``) and the rest rank.
        dataset: the data set; ``split`` is both gallery and query set.
        split: which split.
        rounds: rounds after round 0 (default: the round stage's own ``rounds``).
        k: the cutoff of the cumulative Hits@K.
        limit: only the first ``limit`` images are queries (the gallery stays whole).
        progress: show a progress bar over the rounds.
        seed: picks which object an initial query names.

    Returns:
        The report: ``stages[name]`` with ``rounds`` (R@K per round) and ``hits@K`` (one value per
        round), ``dialogs`` (one per query), ``timings``, ``round_stage``, ``config``.

    Raises:
        ValueError: a pipeline that is not round stage + rank stages, ``rounds`` < 1, ``k`` < 1.
    """
    stage = _round_stage(pipe)
    rounds = stage.rounds if rounds is None else rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    data = dataset.split(split)
    records = data.records[:limit] if limit else data.records
    start = time.perf_counter()
    source = {"dataset": str(data.source.resolve()), "name": data.name, "splits": [split], "images": len(data)}
    if pipe.gallery.source != source or "image" not in pipe.gallery.indexes:
        pipe.index_items({"image": data.image_items()}, source, progress=progress)
    index_seconds = time.perf_counter() - start
    stage.reset_seconds()
    stage.set_metadata({r.id: r.meta for r in data.records})  # EIIRwQR's simulated user reads them
    queries, truth = dialog_queries(records, seed)
    relevant = [{t.id} for t in truth]
    queries = stage.start(queries, truth)
    per_round: dict[str, list[list[list[str]]]] = {}
    retrieve = 0.0
    final: list[Ranking] = []
    for r in tqdm(range(rounds + 1), desc="rounds", disable=not progress):
        if r:
            queries = stage.next_round(queries, final)
        tick = time.perf_counter()
        outputs = _rank(pipe, queries)
        retrieve += time.perf_counter() - tick
        for name, rankings in outputs:
            per_round.setdefault(name, []).append([x.ids for x in rankings])
        final = outputs[-1][1]
    stages = {}
    for name, ids in per_round.items():
        hits = hits_at_k_per_round(ids, relevant, k)
        stages[name] = {"rounds": [{"round": r, **_percent(recall_at_ks(x, relevant, KS))} for r, x in enumerate(ids)],
                        f"hits@{k}": [round(100.0 * h, 2) for h in hits]}
    last = per_round[pipe.stages[-1].name]
    dialogs = [{"id": q.id, "target": t.id, "query": q.text,
                "ranks": [first_relevant_rank(ids[i], {t.id}) for ids in last],
                **{key: q.meta.get(key) for key in DIALOG_KEYS if key in q.meta}}
               for i, (q, t) in enumerate(zip(queries, truth))]
    n = len(records)
    parts = {**{f"{stage.name}.{part}": sec for part, sec in stage.seconds.items()}, "retrieve": retrieve}
    return {
        "genret": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "task": "dialog", "pipeline": pipe.config.name, "round_stage": stage.describe(),
        "dataset": {"name": data.name, "source": str(data.source), "split": split, "images": len(data),
                    "queries": {"dialog": n}},
        "rounds": rounds, "k": k, "seed": seed, "metrics_unit": "percent", "stages": stages, "dialogs": dialogs,
        "fallbacks": _fallbacks(dialogs), "stopped": sum(1 for d in dialogs if d.get("stopped")),
        "timings": {"index_seconds": round(index_seconds, 3),
                    "parts": {p: {"seconds": round(s, 3), "ms_per_query_round": round(1000 * s / (n * (rounds + 1)), 3)}
                              for p, s in parts.items()}},
        "config": to_dict(pipe.config),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }


def _percent(values: dict[str, float]) -> dict[str, float]:
    return {key: round(100.0 * v, 2) for key, v in values.items()}


def _fallbacks(dialogs: list[dict]) -> dict[str, int]:
    turns = [t for d in dialogs for t in d.get("turns") or ()]
    return {"question": sum(1 for t in turns if t.get("question_fallback")),
            "answer": sum(1 for t in turns if t.get("answer_fallback")),
            "summary": sum(1 for d in dialogs if d.get("summary_fallback")),
            "rewrite": sum(1 for d in dialogs for r in d.get("rounds") or () if r.get("fallback"))}
