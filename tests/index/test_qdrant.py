"""The Qdrant backend (local in-memory mode, the real qdrant-client): the same answers as faiss behind the same
contract, saved and loaded with a checked manifest, and clear errors for what a user can get wrong."""

import json

import numpy as np
import pytest

from genret._io import ArtefactError

from genret.index import IndexMismatchError, VectorIndex
from genret.index.gallery import load_index
from genret.index.qdrant_index import QdrantIndex
from genret.pipeline import EncoderConfig, IndexConfig, PipelineConfig, RetrievalPipeline
from genret.types import Query

from conftest import as_legacy


def unit(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype("float32")
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_qdrant_finds_what_exact_faiss_finds(metric):
    x, q = unit(300, 16), unit(12, 16, seed=1)
    ids = [f"i{n}" for n in range(300)]
    flat, qd = VectorIndex(16, metric=metric), QdrantIndex(16, metric=metric)
    for start in range(0, 300, 128):
        flat.add(ids[start:start + 128], x[start:start + 128])
        qd.add(ids[start:start + 128], x[start:start + 128])
    (fs, fi), (qs, qi) = flat.search(q, 10), qd.search(q, 10)
    assert qi == fi and np.allclose(qs, fs, atol=1e-4)
    assert np.allclose(qd.reconstruct(["i7", "i250"]), x[[7, 250]], atol=1e-6)
    assert qd.remove(["i0", "nope", "i299"]) == 2 and len(qd) == 298
    assert all("i0" not in row and "i299" not in row for row in qd.search(x[[0, 299]], 5)[1])


def test_a_saved_local_index_loads_into_a_fresh_collection(tmp_path):
    x = unit(50, 8)
    index = QdrantIndex(8, encoder={"model": "m", "revision": "abc", "dim": 8}, modality="image", collection="c")
    index.add([str(i) for i in range(50)], x)
    index.remove(["3"])
    index.save(tmp_path / "ix")
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert manifest["backend"] == "qdrant" and manifest["count"] == 49 and manifest["rows"] == 50
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == ["ids.json", "manifest.json", "vectors.safetensors"]
    loaded = load_index(tmp_path / "ix", encoder={"model": "m", "revision": "abc", "dim": 8})
    assert isinstance(loaded, QdrantIndex) and loaded.ids == index.ids and loaded.client is not index.client
    assert loaded.search(x[:6], 5)[1] == index.search(x[:6], 5)[1]
    with pytest.raises(IndexMismatchError, match="encoder"):
        load_index(tmp_path / "ix", encoder={"model": "other", "revision": "def", "dim": 8})
    with pytest.raises(IndexMismatchError, match="a qdrant index, not a faiss one"):
        VectorIndex.load(tmp_path / "ix")


def test_a_damaged_saved_index_is_named_and_left_as_it_was(tmp_path):
    index = QdrantIndex(4)
    index.add(["a", "b", "c"], unit(3, 4))
    index.save(tmp_path / "ix")
    vectors = tmp_path / "ix" / "vectors.safetensors"
    good = vectors.read_bytes()
    vectors.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtefactError, match="vectors.safetensors: 104 bytes, the manifest of this index says 208"):
        load_index(tmp_path / "ix")
    as_legacy(tmp_path / "ix")  # without a file list (saved by an older genret), the older checks still name it
    with pytest.raises(IndexMismatchError, match="vectors.safetensors: not readable"):
        load_index(tmp_path / "ix")
    vectors.write_bytes(good)
    ids = tmp_path / "ix" / "ids.json"
    ids.write_text(json.dumps(["a", "b"]))
    with pytest.raises(IndexMismatchError, match="ids.json and manifest.json disagree"):
        load_index(tmp_path / "ix")
    ids.write_text(json.dumps(["a", "b", "c"]))
    vectors.unlink()
    with pytest.raises(FileNotFoundError, match="vectors.safetensors is missing"):
        load_index(tmp_path / "ix")


def test_bad_qdrant_settings_say_what_to_do():
    with pytest.raises(ValueError, match="'faiss' or 'qdrant'"):
        IndexConfig(backend="milvus")
    with pytest.raises(ValueError, match="no faiss settings"):
        IndexConfig(backend="qdrant", shards=2)
    with pytest.raises(ValueError, match="Qdrant settings"):
        IndexConfig(url="http://localhost:6333")
    with pytest.raises(ValueError, match="hnsw_ef=N"):
        QdrantIndex(4, search_params="efSearch=64")
    with pytest.raises(ConnectionError, match="Qdrant at http://127.0.0.1:9: cannot create collection"):
        QdrantIndex(4, url="http://127.0.0.1:9")  # nothing listens on the discard port
    index = QdrantIndex(4, search_params="exact=true,hnsw_ef=64")
    index.add(["a"], unit(1, 4))
    with pytest.raises(ValueError, match="larger than the gallery"):
        index.search(unit(1, 4), 2)
    with pytest.raises(ValueError, match="already in the index"):
        index.add(["a"], unit(1, 4))


def test_a_pipeline_on_qdrant_ranks_as_on_faiss_and_reloads(tmp_path, capsys, world, _encoder, clip_dir):
    def pipeline(**index):
        cfg = PipelineConfig(name="qd", encoder=EncoderConfig(model=str(clip_dir)), index=IndexConfig(**index),
                             stages=({"type": "prefilter", "k": 10},))
        pipe = RetrievalPipeline(cfg, encoder=_encoder)
        pipe.index(world.split("test"), progress=False)
        return pipe

    faiss_pipe, qdrant_pipe = pipeline(), pipeline(backend="qdrant", chunk_size=7)
    assert qdrant_pipe.gallery.index("image").collection == "qd-image"
    test = world.split("test")
    queries = [Query(id=it.id, text=it.text, target="image") for it in test.text_items()[:8]]
    queries += [Query(id="i0", image=test.image_items()[0].image, target="text")]

    def ranked(pipe):
        return [[(c.item_id, round(c.score, 4)) for c in r.candidates] for r in pipe.search(queries, k=5)]

    assert ranked(qdrant_pipe) == ranked(faiss_pipe)
    qdrant_pipe.save(tmp_path / "p")
    again = RetrievalPipeline.load(tmp_path / "p", encoder=_encoder)
    assert isinstance(again.gallery.index("text"), QdrantIndex) and ranked(again) == ranked(faiss_pipe)
    from genret.cli import main

    assert main(["--quiet", "index", "tune", str(tmp_path / "p"), "--json"]) == 0
    assert "Qdrant collection" in capsys.readouterr().out  # not "exact index": Qdrant's HNSW is tuned on its server
