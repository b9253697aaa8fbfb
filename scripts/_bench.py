"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import time
from typing import Callable


def best_of(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` runs of ``fn``, in seconds (the least disturbed by a shared machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def first_images(dataset, split: str, n: int):
    """The dataset with only the first ``n`` images of ``split`` (and their captions); all of it when ``n`` is 0."""
    if not n:
        return dataset
    keep = {r.id for r in dataset.split(split).records[:n]}
    return type(dataset)(dataset.name, dataset.source,
                         tuple(r for r in dataset.records if r.split != split or r.id in keep))
