import json

import numpy as np
import pytest

from genret.index import IndexMismatchError, VectorIndex

from conftest import as_legacy


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


FACTORIES = [("Flat", 1.0), ("HNSW16", 0.9), ("IVF8,Flat", 0.6), ("IVF8,PQ8", 0.3)]


@pytest.mark.parametrize("factory,min_recall", FACTORIES)
def test_search_finds_neighbours_and_roundtrips(tmp_path, factory, min_recall):
    x = unit(600, 32)
    ids = [f"item{i}" for i in range(600)]
    index = VectorIndex(32, factory, encoder={"model": "m", "revision": "r", "dim": 32, "backend": "hf"},
                        search_params="nprobe=4" if "IVF" in factory else "")
    index.add(ids, x)
    exact = VectorIndex(32)
    exact.add(ids, x)
    q = unit(20, 32, seed=1)
    _, got = index.search(q, 10)
    _, want = exact.search(q, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
    assert recall >= min_recall
    index.save(tmp_path / "ix")
    loaded = VectorIndex.load(tmp_path / "ix", encoder={"model": "m", "revision": "r", "dim": 32, "backend": "hf"})
    s1, i1 = index.search(q, 5)
    s2, i2 = loaded.search(q, 5)
    assert i1 == i2 and np.allclose(s1, s2)
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert manifest["count"] == 600 and manifest["factory"] == factory and manifest["dim"] == 32


def test_flat_scores_are_cosine_and_best_first():
    x = unit(50, 8)
    index = VectorIndex(8)
    index.add([str(i) for i in range(50)], x)
    scores, ids = index.search(x[:3], 4)
    assert [row[0] for row in ids] == ["0", "1", "2"]
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat"])
def test_remove_hides_items_and_survives_save(tmp_path, factory):
    x = unit(200, 16)
    index = VectorIndex(16, factory)
    index.add([str(i) for i in range(200)], x)
    assert index.remove(["0", "1"]) == 2
    assert len(index) == 198
    _, ids = index.search(x[:2], 5)
    assert all("0" not in row and "1" not in row for row in ids)
    index.save(tmp_path / "ix")
    loaded = VectorIndex.load(tmp_path / "ix")
    _, ids = loaded.search(x[:2], 5)
    assert all("0" not in row and "1" not in row for row in ids) and len(loaded) == 198
    with pytest.raises(KeyError, match="not in the index"):
        index.remove(["0"])


def test_add_after_load_keeps_ids_unique(tmp_path):
    index = VectorIndex(4)
    index.add(["a", "b"], unit(2, 4))
    index.save(tmp_path / "ix")
    loaded = VectorIndex.load(tmp_path / "ix")
    loaded.add(["c"], unit(1, 4, seed=3))
    assert loaded.ids == ["a", "b", "c"]
    with pytest.raises(ValueError, match="already in the index"):
        loaded.add(["a"], unit(1, 4))


@pytest.mark.parametrize("bad,match", [
    (dict(k=0), "k must be at least 1"),
    (dict(k=11), "larger than the gallery"),
    (dict(q=np.zeros((1, 3), "float32")), "shape"),
    (dict(q=np.full((1, 4), np.nan, "float32")), "NaN"),
])
def test_search_rejects_bad_arguments(bad, match):
    index = VectorIndex(4)
    index.add([str(i) for i in range(10)], unit(10, 4))
    with pytest.raises(ValueError, match=match):
        index.search(bad.get("q", unit(1, 4)), bad.get("k", 3))


def test_bad_factory_and_untrainable_index_are_explained():
    with pytest.raises(ValueError, match="invalid faiss factory"):
        VectorIndex(8, "NotAnIndex")
    index = VectorIndex(8, "IVF64,Flat")
    with pytest.raises(ValueError, match="could not be trained"):
        index.add([str(i) for i in range(10)], unit(10, 8))


def test_loading_with_another_encoder_fails(tmp_path):
    index = VectorIndex(4, encoder={"model": "clip-a", "revision": "1", "dim": 4, "backend": "hf"})
    index.add(["a"], unit(1, 4))
    index.save(tmp_path / "ix")
    with pytest.raises(IndexMismatchError, match="built with encoder 'clip-a'"):
        VectorIndex.load(tmp_path / "ix", encoder={"model": "clip-b", "revision": "2", "dim": 4, "backend": "hf"})
    # a local model is known by its weights' fingerprint: the same weights under another path (a copy, or the
    # folder reached from another working directory) load; a hub model's fingerprint carries its id
    VectorIndex.load(tmp_path / "ix", encoder={"model": "/elsewhere/clip-a", "revision": "1", "dim": 4, "backend": "hf"})
    hub = VectorIndex(4, encoder={"model": "org/a", "revision": "org/a@c1", "dim": 4, "backend": "hf"})
    hub.add(["a"], unit(1, 4))
    hub.save(tmp_path / "hub")
    with pytest.raises(IndexMismatchError, match="built with encoder 'org/a'"):
        VectorIndex.load(tmp_path / "hub", encoder={"model": "org/b", "revision": "org/b@c1", "dim": 4, "backend": "hf"})
    with pytest.raises(IndexMismatchError, match="dim"):
        VectorIndex.load(tmp_path / "ix", encoder={"model": "clip-a", "revision": "1", "dim": 8, "backend": "hf"})


def test_failed_save_keeps_the_previous_index(tmp_path, monkeypatch):
    index = VectorIndex(4)
    index.add(["a", "b"], unit(2, 4))
    index.save(tmp_path / "ix")
    index.add(["c"], unit(1, 4, seed=2))

    import genret.index.faiss_index as mod

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "write_json", broken)
    with pytest.raises(OSError):
        index.save(tmp_path / "ix")
    monkeypatch.undo()
    assert VectorIndex.load(tmp_path / "ix").ids == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ix"]


def test_corrupt_manifest_names_the_file(tmp_path):
    index = VectorIndex(4)
    index.add(["a"], unit(1, 4))
    index.save(tmp_path / "ix")
    (tmp_path / "ix" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: line 1"):
        VectorIndex.load(tmp_path / "ix")


def test_a_swapped_or_cut_index_file_is_refused_by_name(tmp_path):
    """index.faiss from another build (other vector count) returned wrong ids silently; a cut one gave faiss's
    C++ traceback."""
    import numpy as np

    from genret._io import ArtefactError
    from genret.index import IndexMismatchError, VectorIndex

    rng = np.random.default_rng(0)
    small, big = VectorIndex(8, "Flat"), VectorIndex(8, "Flat")
    small.add([f"a{i}" for i in range(5)], rng.normal(size=(5, 8)).astype("float32"))
    big.add([f"b{i}" for i in range(9)], rng.normal(size=(9, 8)).astype("float32"))
    small.save(tmp_path / "small")
    big.save(tmp_path / "big")
    (tmp_path / "small" / "index.faiss").write_bytes((tmp_path / "big" / "index.faiss").read_bytes())
    with pytest.raises(ArtefactError, match=r"small/index.faiss: \d+ bytes, the manifest of this index says \d+"):
        VectorIndex.load(tmp_path / "small")
    as_legacy(tmp_path / "small")  # without a file list, the counts still disagree
    with pytest.raises(IndexMismatchError, match=r"small: index.faiss, ids.json and manifest.json disagree .*9 vectors, 5 ids"):
        VectorIndex.load(tmp_path / "small")
    data = (tmp_path / "big" / "index.faiss").read_bytes()
    (tmp_path / "big" / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtefactError, match=r"big/index.faiss: \d+ bytes"):
        VectorIndex.load(tmp_path / "big")
    as_legacy(tmp_path / "big")
    with pytest.raises(IndexMismatchError, match=r"big/index.faiss: not a readable faiss index"):
        VectorIndex.load(tmp_path / "big")


@pytest.mark.parametrize("factory", ["IVF4,Flat", "Flat", "HNSW16"])
def test_after_a_removal_every_item_still_finds_itself(factory):
    """IndexIDMap2's removal renumbers its ids as a flat index does; IVF does not renumber, so its ids pointed at
    the wrong vectors after a removal (every later search answered other items)."""
    x = unit(300, 16)
    index = VectorIndex(16, factory, search_params="nprobe=4" if "IVF" in factory else "")
    index.add([str(i) for i in range(300)], x)
    index.remove([str(i) for i in range(0, 300, 7)])
    kept = [i for i in range(300) if i % 7]
    assert [row[0] for row in index.search(x[kept], 1)[1]] == [str(i) for i in kept]
    assert np.allclose(index.reconstruct([str(i) for i in kept[:20]]), x[kept[:20]], atol=1e-6)
