"""Retrieval metrics as pure functions over rankings: R@K, RSUM, MRR, mAP@K, NDCG@K, R_subset@K, Hits@K.

Every metric returns a fraction in ``[0, 1]`` (RSUM returns the sum of its inputs); the reports multiply by 100
to print percentages. Inputs are per query: a ranked list of item ids (best first) and the query's relevant
ids (or, for NDCG, a mapping id -> graded relevance).

A ranking that lists an id more than once counts it once: later repeats are dropped before ranks are assigned,
so ``["a", "a", "b"]`` ranks ``b`` second. A query with no relevant ids scores 0 under every metric. Bad input
(empty rankings, per-query arguments of another length, ``k < 1``) raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Collection, Mapping, Sequence

__all__ = [
    "average_precision_at_k", "first_relevant_rank", "hits_at_k_per_round", "map_at_k", "mrr",
    "ndcg_at_k", "recall_at_k", "recall_at_ks", "recall_subset_at_k", "rsum",
]  # fmt: skip


Rankings = Sequence[Sequence[str]]
"""One ranked id list per query, best first."""
Relevant = Sequence[Collection[str]]
"""One collection of relevant ids per query."""


def _dedup(ranked: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(ranked))


def _check_k(k: int | None) -> None:
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def _validate(rankings: Rankings, k: int | None, **per_query: Sequence) -> None:
    """Check that ``rankings`` is non-empty, ``k`` is valid, and each ``per_query`` argument has one entry per query."""
    if len(rankings) == 0:
        raise ValueError("rankings must not be empty")
    for name, values in {"rankings": rankings, **per_query}.items():
        if len(values) != len(rankings):
            raise ValueError(f"{name} has {len(values)} entries but rankings has {len(rankings)}")
        # A bare string is a Sequence/Collection of characters: almost always a missing level of nesting.
        if any(isinstance(v, str) for v in values):
            raise ValueError(f"{name} must hold one collection of ids per query, not bare strings")
    _check_k(k)


def _mean_over_queries(
    rankings: Rankings,
    relevant: Sequence,
    k: int | None,
    score: Callable[[list[str], Any], float],
    name: str = "relevant",
) -> float:
    """Validate, then average ``score(deduplicated ranking, relevant)`` over queries."""
    _validate(rankings, k, **{name: relevant})
    return sum(score(_dedup(r), rel) for r, rel in zip(rankings, relevant)) / len(rankings)


def _hit(ranked: Sequence[str], relevant: Collection[str], k: int) -> bool:
    rank = first_relevant_rank(ranked, relevant)
    return rank is not None and rank <= k


def first_relevant_rank(ranked: Sequence[str], relevant: Collection[str]) -> int | None:
    """1-based rank of the first relevant id in ``ranked``.

    Args:
        ranked: item ids, best first.
        relevant: the query's relevant ids.

    Returns:
        The rank, or ``None`` if no relevant id is in the list.

    >>> first_relevant_rank(["a", "b", "c"], {"c", "z"})
    3
    >>> first_relevant_rank(["a", "b"], {"z"}) is None
    True
    """
    wanted = set(relevant)
    for rank, item in enumerate(_dedup(ranked), start=1):
        if item in wanted:
            return rank
    return None


def recall_at_k(rankings: Rankings, relevant: Relevant, k: int) -> float:
    """Fraction of queries with at least one relevant id in the top ``k`` (the field's R@K).

    For image-to-text, pass all of an image's captions as its relevant set: any one in the top K is a hit.

    Args:
        rankings: one ranked id list per query.
        relevant: one collection of relevant ids per query.
        k: cutoff, >= 1.

    Returns:
        R@K as a fraction in [0, 1].

    >>> recall_at_k([["a", "b"], ["c", "d"]], [{"b"}, {"x"}], k=2)
    0.5
    """
    return _mean_over_queries(rankings, relevant, k, lambda r, rel: float(_hit(r, rel, k)))


def recall_at_ks(rankings: Rankings, relevant: Relevant, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K for several cutoffs at once.

    Args:
        rankings: one ranked id list per query.
        relevant: one collection of relevant ids per query.
        ks: cutoffs, each >= 1.

    Returns:
        ``{"R@1": ..., "R@5": ..., "R@10": ...}`` (one key per cutoff), fractions in [0, 1].

    >>> recall_at_ks([["a", "b", "c"]], [{"b"}], ks=(1, 2))
    {'R@1': 0.0, 'R@2': 1.0}
    """
    if len(ks) == 0:
        raise ValueError("ks must name at least one cutoff")
    return {f"R@{k}": recall_at_k(rankings, relevant, k) for k in ks}


def rsum(t2i: Mapping[str, float], i2t: Mapping[str, float]) -> float:
    """RSUM: R@1 + R@5 + R@10 of text-to-image plus the same of image-to-text, in the inputs' unit.

    Args:
        t2i: text-to-image recalls with keys ``"R@1"``, ``"R@5"``, ``"R@10"``.
        i2t: image-to-text recalls with the same keys.

    Returns:
        The sum of the six recalls.

    >>> rsum({"R@1": 50.0, "R@5": 80.0, "R@10": 90.0}, {"R@1": 60.0, "R@5": 85.0, "R@10": 95.0})
    460.0
    """
    keys = ("R@1", "R@5", "R@10")
    for name, scores in (("t2i", t2i), ("i2t", i2t)):
        missing = [key for key in keys if key not in scores]
        if missing:
            raise ValueError(f"{name} lacks {', '.join(missing)}; rsum needs R@1, R@5 and R@10")
    return float(sum(t2i[key] + i2t[key] for key in keys))


def mrr(rankings: Rankings, relevant: Relevant, k: int | None = None) -> float:
    """Mean reciprocal rank of the first relevant id.

    Args:
        rankings: one ranked id list per query.
        relevant: one collection of relevant ids per query.
        k: cutoff; a first hit below rank ``k`` scores 0. ``None`` uses the whole list.

    Returns:
        MRR (or MRR@k) as a fraction in [0, 1].

    >>> mrr([["a", "b"], ["c", "d"], ["e"]], [{"a"}, {"d"}, {"x"}])
    0.5
    """

    def reciprocal(ranked: list[str], rel: Collection[str]) -> float:
        rank = first_relevant_rank(ranked, rel)
        return 1.0 / rank if rank is not None and (k is None or rank <= k) else 0.0

    return _mean_over_queries(rankings, relevant, k, reciprocal)


def average_precision_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """CIRCO's AP@K for one query: ``(1 / min(K, |relevant|)) * sum_{i<=K} P@i * rel(i)``.

    Args:
        ranked: item ids, best first.
        relevant: the query's relevant ids; an empty set scores 0.
        k: cutoff, >= 1.

    Returns:
        AP@K as a fraction in [0, 1].

    >>> average_precision_at_k(["a", "x", "b"], {"a", "b"}, k=3)  # (1/1 + 2/3) / 2
    0.8333333333333333
    """
    _check_k(k)
    wanted = set(relevant)
    if not wanted:
        return 0.0
    hits, total = 0, 0.0
    for i, item in enumerate(_dedup(ranked)[:k], start=1):
        if item in wanted:
            hits += 1
            total += hits / i
    return total / min(k, len(wanted))


def map_at_k(rankings: Rankings, relevant: Relevant, k: int) -> float:
    """Mean of :func:`average_precision_at_k` over queries (CIRCO's mAP@K).

    Args:
        rankings: one ranked id list per query.
        relevant: one collection of relevant ids per query.
        k: cutoff, >= 1.

    Returns:
        mAP@K as a fraction in [0, 1].

    >>> map_at_k([["a", "b"], ["x", "c"]], [{"a"}, {"c"}], k=2)  # (1 + 1/2) / 2
    0.75
    """
    return _mean_over_queries(rankings, relevant, k, lambda r, rel: average_precision_at_k(r, rel, k))


def _gains(judgement: Mapping[str, float] | Collection[str]) -> dict[str, float]:
    if not isinstance(judgement, Mapping):
        return {item: 1.0 for item in judgement}
    if any(grade < 0 for grade in judgement.values()):
        raise ValueError("relevance grades must be >= 0")
    return {item: 2.0**grade - 1.0 for item, grade in judgement.items()}


def ndcg_at_k(rankings: Rankings, relevance: Sequence[Mapping[str, float] | Collection[str]], k: int) -> float:
    """Mean NDCG@K: gain ``2**rel - 1`` discounted by ``log2(rank + 1)``, normalised by the ideal DCG.

    Args:
        rankings: one ranked id list per query.
        relevance: per query, a collection of relevant ids (binary, gain 1) or a mapping id -> grade >= 0.
            The ideal DCG comes from these judgements; a query with no positive judgement scores 0.
        k: cutoff, >= 1.

    Returns:
        NDCG@K as a fraction in [0, 1].

    >>> ndcg_at_k([["x", "a"]], [{"a"}], k=2)  # (1 / log2(3)) / 1
    0.6309297535714575
    >>> ndcg_at_k([["b", "a"]], [{"a": 2, "b": 1}], k=2)  # (1 + 3/log2(3)) / (3 + 1/log2(3))
    0.7967075809905066
    """

    def ndcg(ranked: list[str], judgement: Mapping[str, float] | Collection[str]) -> float:
        gains = _gains(judgement)
        ideal = sorted(gains.values(), reverse=True)[:k]
        idcg = sum(g / math.log2(i + 1) for i, g in enumerate(ideal, start=1))
        if idcg <= 0:
            return 0.0
        dcg = sum(gains.get(item, 0.0) / math.log2(i + 1) for i, item in enumerate(ranked[:k], start=1))
        return dcg / idcg

    return _mean_over_queries(rankings, relevance, k, ndcg, name="relevance")


def recall_subset_at_k(rankings: Rankings, relevant: Relevant, subsets: Sequence[Collection[str]], k: int) -> float:
    """CIRR's R_subset@K: recall@K after keeping, in order, only the ids in each query's subset.

    Args:
        rankings: one ranked id list per query (over the full gallery).
        relevant: one collection of relevant ids per query.
        subsets: per query, the ids of its candidate subset.
        k: cutoff, >= 1.

    Returns:
        R_subset@K as a fraction in [0, 1].

    >>> recall_subset_at_k([["a", "b", "c"]], [{"c"}], [{"b", "c"}], k=2)
    1.0
    """
    _validate(rankings, k, subsets=subsets)
    keeps = [set(subset) for subset in subsets]
    return recall_at_k([[i for i in ranked if i in keep] for ranked, keep in zip(rankings, keeps)], relevant, k)


def hits_at_k_per_round(rankings_per_round: Sequence[Rankings], relevant: Relevant, k: int = 10) -> list[float]:
    """ChatIR's cumulative Hits@K: per dialog round, the fraction of queries hit at that round or any earlier one.

    Args:
        rankings_per_round: ``rankings_per_round[r][q]`` is query ``q``'s ranking after round ``r``.
        relevant: one collection of target ids per query.
        k: cutoff, >= 1.

    Returns:
        One fraction per round, non-decreasing.

    >>> hits_at_k_per_round([[["x", "t"], ["u"]], [["t"], ["x"]]], [{"t"}, {"u"}], k=1)
    [0.5, 1.0]
    """
    if len(rankings_per_round) == 0:
        raise ValueError("rankings_per_round must hold at least one round")
    if len(relevant) == 0:
        raise ValueError("relevant must not be empty")
    hit_so_far = [False] * len(relevant)
    curve = []
    for r, rankings in enumerate(rankings_per_round):
        if len(rankings) != len(relevant):
            raise ValueError(f"rankings_per_round[{r}] has {len(rankings)} rankings but relevant has {len(relevant)}")
        _validate(rankings, k, relevant=relevant)
        hit_so_far = [done or _hit(ranked, rel, k) for done, ranked, rel in zip(hit_so_far, rankings, relevant)]
        curve.append(sum(hit_so_far) / len(hit_so_far))
    return curve
