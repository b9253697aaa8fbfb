"""Tuning efSearch / nprobe for a recall target, and `genret index tune` on a saved pipeline."""

import json

import numpy as np
import pytest

from genret.cli import main
from genret.index import VectorIndex
from genret.index.tune import exact_search, tune


def data(n=6000, dim=96, queries=150, seed=0):
    """Clustered vectors with queries shifted off them (a modality gap), where a small efSearch misses."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim))
    x = centres[rng.integers(0, 32, n)] + 0.9 * rng.standard_normal((n, dim))
    q = centres[rng.integers(0, 32, queries)] + 0.9 * rng.standard_normal((queries, dim)) + 0.5 * rng.standard_normal(dim)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype("float32")  # noqa: E731
    return unit(x), unit(q)


@pytest.mark.parametrize("factory,shards", [("HNSW8", 1), ("HNSW8", 2), ("IVF64,Flat", 1), ("IVF64,PQ16", 1)])
def test_tuning_finds_the_smallest_value_that_reaches_the_target(factory, shards):
    x, q = data()
    ids = [str(i) for i in range(len(x))]
    index = VectorIndex(x.shape[1], factory, shards=shards)
    index.add(ids, x)
    flat = VectorIndex(x.shape[1])
    flat.add(ids, x)
    if "PQ" not in factory:  # HNSW's storage and IVF-Flat's lists hold the vectors: exact is exact
        assert exact_search(index, q, 10) == flat.search(q, 10)[1]
    result = tune(index, q, k=10, target=0.97)
    assert result.recall >= 0.97 and index.search_params == result.search_params
    tried = {r["value"]: r["recall"] for r in result.rows}
    below = [v for v, r in tried.items() if r < 0.97]
    assert below and max(below) < result.value  # a smaller value was tried and missed: the choice is the least
    assert all(r >= 0.97 for v, r in tried.items() if v >= result.value)


def test_an_exact_index_and_a_bad_target_are_refused():
    index = VectorIndex(4)
    index.add(["a"], np.ones((1, 4), "float32"))
    with pytest.raises(ValueError, match="exact: there is no search parameter"):
        tune(index, np.ones((1, 4), "float32"))
    hnsw = VectorIndex(4, "HNSW8")
    hnsw.add(["a"], np.ones((1, 4), "float32"))
    with pytest.raises(ValueError, match=r"target must be in \(0, 1\]"):
        tune(hnsw, np.ones((1, 4), "float32"), target=1.5)


def test_genret_index_tune_saves_its_choice_in_the_manifest(tmp_path, clip_dir, world_dir, capsys):
    out = tmp_path / "pipe"
    assert main(["-q", "index", "build", str(clip_dir), "--data", str(world_dir), "--out", str(out), "--factory",
                 "HNSW8"]) == 0
    capsys.readouterr()
    assert main(["-q", "index", "tune", str(out), "--recall", "0.99", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {r["modality"] for r in report} == {"image", "text"}
    image = next(r for r in report if r["modality"] == "image")
    assert image["queries"].endswith("text vectors") and image["reached"]
    manifest = json.loads((out / "gallery/images/manifest.json").read_text())
    assert manifest["search_params"] == image["search_params"] and manifest["tuning"]["target_recall"] == 0.99
    from genret.pipeline import RetrievalPipeline

    assert RetrievalPipeline.load(out).gallery.index("image").search_params == image["search_params"]
    assert main(["index", "tune", str(tmp_path / "nowhere")]) == 2
    assert "no gallery/gallery.json" in capsys.readouterr().err


def test_the_target_is_reached_with_confidence_not_by_the_sample_mean_alone():
    from genret.index.tune import lower_bound

    assert lower_bound(np.array([1.0, 1.0, 0.0, 0.0]), 0.5) == 0.5
    assert abs(lower_bound(np.array([1.0, 1.0, 0.0, 0.0]), 0.95) - (0.5 - 1.6449 * 0.57735 / 2)) < 1e-4
    x, q = data()
    index = VectorIndex(x.shape[1], "HNSW8")
    index.add([str(i) for i in range(len(x))], x)
    by_mean, confident = tune(index, q, target=0.97, confidence=0.5), tune(index, q, target=0.97, confidence=0.99)
    assert by_mean.lower == by_mean.recall >= 0.97
    assert confident.lower >= 0.97 and confident.recall > confident.lower and confident.value > by_mean.value
    assert all(r["lower"] < 0.97 for r in confident.rows if r["value"] < confident.value)
    with pytest.raises(ValueError, match=r"confidence must be in \[0.5, 1\)"):
        tune(index, q, confidence=1.0)
