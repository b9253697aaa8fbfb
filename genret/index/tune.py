"""Choosing an approximate index's search parameter for a recall target, on queries like the real ones.

An HNSW graph's recall rises with ``efSearch`` and an IVF index's with ``nprobe``, and so does the time per query;
the right value depends on the data. :func:`tune` measures recall@k against exact search for a ladder of values
(doubling from a small one), then bisects between the last value below the target and the first above it, and
returns the smallest value that reaches the target with the whole table it measured.

"Reaches" is judged on a lower confidence bound, not on the mean alone: the tuning queries are a sample, and the
least value whose sample mean touches the target falls short on other queries about half the time (at 1M vectors,
efSearch chosen at 0.953 on 1,000 queries gave 0.941 on 1,000 others). With ``confidence`` c the mean minus
z(c) standard errors of the per-query recalls must reach the target (c = 0.95: z = 1.645; c = 0.5: the mean).

Exact search: an HNSW index searches its own flat storage, an IVF index probes every list (its codes are what it
holds: for IVF-PQ the reference is exhaustive search over the codes, not over the original vectors).

Queries: ``genret index tune`` uses the gallery's other modality (captions for the image index, images for the
caption index): the queries it will be asked, modality gap included. A gallery's own vectors would find
themselves and overstate recall.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from genret.index.faiss_index import VectorIndex

LADDERS = {"efSearch": [16, 32, 64, 128, 256, 512, 1024, 2048, 4096], "nprobe": [1, 2, 4, 8, 16, 32, 64, 128, 256,
                                                                                    512, 1024, 2048, 4096]}


@dataclass
class Tuning:
    """What :func:`tune` measured: the chosen value and every value tried (``rows``: value, recall, ms/query)."""

    param: str
    value: int | None
    recall: float
    target: float
    k: int
    rows: list[dict] = field(default_factory=list)
    confidence: float = 0.5
    lower: float | None = None  # the chosen value's lower confidence bound on recall

    @property
    def search_params(self) -> str:
        """The faiss parameter string of the chosen value."""
        return f"{self.param}={self.value}" if self.value is not None else ""


def tunable(index: VectorIndex) -> str | None:
    """The search parameter of ``index`` that trades speed for recall (``efSearch``, ``nprobe``), or None."""
    if not isinstance(index, VectorIndex):  # another backend (Qdrant) tunes its own graph
        return None
    inner = faiss.downcast_index(index.parts[0].index)
    if isinstance(inner, faiss.IndexHNSW):
        return "efSearch"
    if faiss.try_extract_index_ivf(inner) is not None:
        return "nprobe"
    return None


def exact_search(index: VectorIndex, queries: np.ndarray, k: int) -> list[list[str]]:
    """The true top ``k`` item ids of each query (see the module notes for what "true" is per index type)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    fetch = min(k + len(index._tombstones), index.index.ntotal)
    scores, rows = [], []
    for part in index.parts:
        inner = faiss.downcast_index(part.index)
        position = faiss.vector_to_array(part.id_map)  # the inner index's positions -> genret rows
        if isinstance(inner, faiss.IndexHNSW):
            s, p = faiss.downcast_index(inner.storage).search(queries, min(fetch, inner.ntotal))
        elif (ivf := faiss.try_extract_index_ivf(inner)) is not None:
            s, p = part.search(queries, min(fetch, inner.ntotal), params=faiss.SearchParametersIVF(nprobe=ivf.nlist))
            position = None  # the id map has already translated
        else:
            s, p = inner.search(queries, min(fetch, inner.ntotal))
        rows.append(np.where(p >= 0, position[np.maximum(p, 0)], -1) if position is not None else p)
        scores.append(s)
    s, r = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
    best = -s if index.metric == "ip" else s
    order = np.argsort(best, axis=1, kind="stable")
    out = []
    for qi in range(len(queries)):
        kept = [int(r[qi, j]) for j in order[qi] if r[qi, j] >= 0 and int(r[qi, j]) not in index._tombstones][:k]
        out.append([index._ids[row] for row in kept])
    return out


def recall_at(index: VectorIndex, queries: np.ndarray, truth: list[list[str]], k: int) -> tuple[float, float]:
    """Recall@k of ``index`` as its search parameters stand, and its milliseconds per query (batched)."""
    per_query, ms = _recalls(index, queries, truth, k)
    return float(per_query.mean()), ms


def _recalls(index: VectorIndex, queries: np.ndarray, truth: list[list[str]], k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, got = index.search(queries, k)
    ms = 1000 * (time.perf_counter() - start) / len(queries)
    return np.array([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth) if t]), ms


def lower_bound(per_query: np.ndarray, confidence: float) -> float:
    """The mean of ``per_query`` less z(confidence) standard errors (one-sided normal bound)."""
    from statistics import NormalDist

    if len(per_query) < 2 or confidence <= 0.5:
        return float(per_query.mean())
    z = NormalDist().inv_cdf(confidence)
    return float(per_query.mean() - z * per_query.std(ddof=1) / np.sqrt(len(per_query)))


def tune(index: VectorIndex, queries: np.ndarray, k: int = 10, target: float = 0.95, progress=None,
         confidence: float = 0.95) -> Tuning:
    """The smallest value of the index's search parameter whose recall@k reaches ``target`` on ``queries``, with
    ``confidence`` (the lower bound of the module notes; 0.5 judges by the mean).

    The index keeps the chosen ``search_params`` (or the largest tried when none reaches the target: then
    ``Tuning.value`` is that value and ``Tuning.recall`` says how far it got).

    Raises:
        ValueError: an exact index (nothing to tune), a target outside (0, 1] or a confidence outside [0.5, 1).
    """
    param = tunable(index)
    if param is None:
        raise ValueError(f"index {index.factory!r} is exact: there is no search parameter to tune")
    if not 0 < target <= 1:
        raise ValueError(f"the recall target must be in (0, 1], got {target}")
    if not 0.5 <= confidence < 1:
        raise ValueError(f"the confidence must be in [0.5, 1), got {confidence}")
    k = min(k, len(index))
    truth = exact_search(index, queries, k)
    measured: dict[int, tuple[float, float, float]] = {}  # value -> (recall, lower bound, ms/query)

    def measure(value: int) -> float:
        """The value's lower bound (what is compared with the target)."""
        if value not in measured:
            index.search_params = f"{param}={value}"
            per_query, ms = _recalls(index, queries, truth, k)
            measured[value] = (float(per_query.mean()), lower_bound(per_query, confidence), ms)
            if progress:
                progress(param, value, measured[value][0], ms)
        return measured[value][1]

    ladder = [v for v in LADDERS[param] if param != "nprobe" or v <= _nlist(index)]
    low, high = None, None
    for value in ladder:
        if measure(value) >= target:
            high = value
            break
        low = value
    if high is not None and low is not None:  # bisect to within an eighth of the step
        while high - low > max(1, low // 8):
            mid = (low + high) // 2
            low, high = (low, mid) if measure(mid) >= target else (mid, high)
    chosen = high if high is not None else ladder[-1]
    index.search_params = f"{param}={chosen}"
    rows = [{"value": v, "recall": round(r, 4), "lower": round(lo, 4), "ms_per_query": round(ms, 3)}
            for v, (r, lo, ms) in sorted(measured.items())]
    return Tuning(param, chosen, measured[chosen][0], target, k, rows, confidence, measured[chosen][1])


def _nlist(index: VectorIndex) -> int:
    return faiss.try_extract_index_ivf(faiss.downcast_index(index.parts[0].index)).nlist


def record(folder, tuning: Tuning, queries: str) -> None:
    """Write the chosen parameter into a saved index's manifest (atomically), with what chose it."""
    from pathlib import Path

    from genret._io import read_json, seal

    path = Path(folder) / "manifest.json"
    manifest = read_json(path, what="index manifest")
    manifest["search_params"] = tuning.search_params
    manifest["tuning"] = {"target_recall": tuning.target, "k": tuning.k, "recall": round(tuning.recall, 4),
                          "confidence": tuning.confidence, "lower_bound": round(tuning.recall if tuning.lower is None else tuning.lower, 4),
                          "queries": queries, "tried": tuning.rows}
    seal(folder, "manifest.json", manifest)  # written anew (a file of its own), with its file list and digest
