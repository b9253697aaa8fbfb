"""MLLM embedders as the prefilter encoder: genret's embeddings equal the authors' procedure (fp32, 1e-4) on shrunk
checkpoints with the real tokenizer, template and processor settings; instructions, Matryoshka truncation, the
embedding cache and the index manifest follow the settings."""

import numpy as np
import pytest
import torch
from PIL import Image

from embedder_checkpoints import build_gme, shared_qwen3_vl_embedding
from genret.encoders import EmbeddingCache
from genret.encoders.mllm import MLLMEmbedder, _processor_without_torchvision
from genret.index.faiss_index import IndexMismatchError
from genret.mllm.backend import load_processor

ATOL = 1e-4
QUERY = "Retrieve images or text relevant to the user's query"  # the README's, without its final "."
TEXTS = ["a red circle left of a blue square", "two small cats on a sofa", "Ein Hund im Schnee"]
# on the 32-pixel grid (64x64, 64x96), off it (45x70: resized up), and over nothing (300x200)
SIZES = [(64, 64), (64, 96), (45, 70), (300, 200)]


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return shared_qwen3_vl_embedding(tmp_path_factory)  # also served in tests/serve/test_embedding_roles.py


@pytest.fixture(scope="module")
def qwen3(qwen3_dir):
    return MLLMEmbedder(str(qwen3_dir), embedder="qwen3-vl-embedding", device="cpu", query_instruction=QUERY)


@pytest.fixture(scope="module")
def qwen3_reference(qwen3_dir):
    from reference import qwen3_vl_embedding as ref

    model = ref.Qwen3VLForEmbedding.from_pretrained(str(qwen3_dir), dtype=torch.float32).eval()
    processor = load_processor(str(qwen3_dir), padding_side="right")
    return lambda inputs: ref.embed(model, processor, inputs).numpy()


def test_qwen3_vl_embedding_equals_the_authors_procedure(qwen3, qwen3_reference):
    images = _images()
    queries = qwen3.encode_texts(TEXTS, role="query")
    want = qwen3_reference([{"text": t, "instruction": QUERY} for t in TEXTS])
    assert np.abs(queries - want).max() < ATOL
    docs = qwen3.encode_images(images, role="document")  # documents: the default instruction
    assert np.abs(docs - qwen3_reference([{"image": im} for im in images])).max() < ATOL
    pairs = qwen3.encode_pairs(images[:3], TEXTS)
    want = qwen3_reference([{"image": im, "text": t, "instruction": QUERY} for im, t in zip(images, TEXTS)])
    assert np.abs(pairs - want).max() < ATOL
    # the instruction is what sets a query apart: as a document the same text embeds elsewhere
    assert np.abs(qwen3.encode_texts(TEXTS, role="document") - queries).max() > 1e-2


@pytest.mark.slow
def test_qwen3_vl_embedding_equals_sentence_transformers_on_the_folder(qwen3, qwen3_dir):
    """What a user of sentence-transformers gets from the same folder (images on the 32-pixel grid, which its
    processor leaves as they are)."""
    from sentence_transformers import SentenceTransformer

    with _processor_without_torchvision():  # this machine has no torchvision (see genret.encoders.mllm)
        st = SentenceTransformer(str(qwen3_dir), device="cpu",
                                 processor_kwargs={"min_pixels": 4 * 32 * 32, "max_pixels": 1800 * 32 * 32})
    texts = st.encode(TEXTS, prompt=QUERY + ".", convert_to_numpy=True)
    assert np.abs(qwen3.encode_texts(TEXTS, role="query") - texts).max() < ATOL
    grid = _images()[:2]
    ims = st.encode(grid, prompt="Represent the user's input.", convert_to_numpy=True)
    assert np.abs(qwen3.encode_images(grid, role="document") - ims).max() < ATOL


@pytest.mark.slow
def test_matryoshka_truncates_then_normalises(qwen3, qwen3_dir, qwen3_reference):
    small = MLLMEmbedder(str(qwen3_dir), embedder="qwen3-vl-embedding", device="cpu", query_instruction=QUERY, dim=32)
    assert small.dim == 32 and small.describe()["settings"]["dim"] == 32
    got = small.encode_texts(TEXTS, role="query")
    full = qwen3_reference([{"text": t, "instruction": QUERY} for t in TEXTS])[:, :32]
    assert np.abs(got - full / np.linalg.norm(full, axis=1, keepdims=True)).max() < ATOL
    with pytest.raises(ValueError, match="have 64 dimensions"):
        MLLMEmbedder(str(qwen3_dir), embedder="qwen3-vl-embedding", device="cpu", dim=65)


@pytest.mark.slow
def test_cache_is_kept_per_role_and_instruction(qwen3_dir, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path / "cache")
    first = MLLMEmbedder(str(qwen3_dir), embedder="qwen3-vl-embedding", device="cpu", cache=cache)
    docs = first.encode_texts(TEXTS, role="document")
    calls = []
    real = MLLMEmbedder._embed
    monkeypatch.setattr(MLLMEmbedder, "_embed", lambda self, *a: calls.append(a[-1]) or real(self, *a))
    again = MLLMEmbedder(str(qwen3_dir), embedder="qwen3-vl-embedding", device="cpu", cache=EmbeddingCache(cache.root))
    assert np.array_equal(again.encode_texts(TEXTS, role="document"), docs) and calls == []
    # as queries under the same (default) instruction they are the same vectors: served from the same entries
    assert np.array_equal(again.encode_texts(TEXTS, role="query"), docs) and calls == []
    other = MLLMEmbedder(str(qwen3_dir), embedder="qwen3-vl-embedding", device="cpu", cache=EmbeddingCache(cache.root),
                         document_instruction="Represent the image for retrieval.")
    other.encode_texts(TEXTS, role="document")
    assert calls == ["document"]  # another instruction: embedded again
    with pytest.raises(ValueError, match="role='query' or role='document'"):
        other.encode_texts(TEXTS)


@pytest.mark.slow
def test_index_manifest_refuses_other_document_settings(qwen3, qwen3_dir, world, tmp_path):
    from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
    from genret.types import Query

    data = world.split("test")
    config = PipelineConfig(encoder=EncoderConfig(model=str(qwen3_dir), backend="mllm", embedder="qwen3-vl-embedding",
                                                  query_instruction=QUERY), stages=({"type": "prefilter", "k": 5},))
    pipe = RetrievalPipeline(config, encoder=qwen3)
    pipe.index(data, progress=False)
    pipe.save(tmp_path / "pipe")
    # the index holds documents: their vectors are what the encoder makes of the gallery
    item = data.records[0]
    want = qwen3.encode_images([str(item.path)], role="document")[0]
    index = pipe.gallery.index("image")
    assert np.abs(index.reconstruct([index.ids[0]])[0] - want).max() < ATOL
    other_docs = MLLMEmbedder(str(qwen3_dir), embedder="qwen3-vl-embedding", device="cpu",
                              document_instruction="Represent the image.")
    with pytest.raises(IndexMismatchError, match="settings"):
        RetrievalPipeline.load(tmp_path / "pipe", encoder=other_docs)
    loaded = RetrievalPipeline.load(tmp_path / "pipe")  # from the saved [encoder] table: the same settings
    assert loaded.encoder.instructions["query"] == QUERY + "."
    other_queries = MLLMEmbedder(str(qwen3_dir), embedder="qwen3-vl-embedding", device="cpu",
                                 query_instruction="Find the picture.")
    ranking = RetrievalPipeline.load(tmp_path / "pipe", encoder=other_queries).search(
        [Query(id="q", text=item.captions[0])], k=3)[0]
    assert len(ranking.candidates) == 3


def test_encoder_settings_are_checked_as_the_file_is_read():
    from genret.pipeline import EncoderConfig

    with pytest.raises(ValueError, match='backend = "mllm"'):
        EncoderConfig(model="m", query_instruction="x")
    with pytest.raises(ValueError, match="unknown embedder 'qwen9'"):
        MLLMEmbedder("Qwen/Qwen3-VL-Embedding-2B", embedder="qwen9")
    with pytest.raises(ValueError, match="say which embedder"):
        MLLMEmbedder("some/fine-tune")


# -- GME ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gme_dir(tmp_path_factory):
    return build_gme(tmp_path_factory.mktemp("gme") / "model")


def test_gme_equals_the_authors_procedure(gme_dir):
    from transformers import AutoModelForImageTextToText

    from reference import gme

    instruction = "Find an image that matches the given text."
    encoder = MLLMEmbedder(str(gme_dir), embedder="gme", device="cpu", query_instruction=instruction)
    model = AutoModelForImageTextToText.from_pretrained(str(gme_dir), dtype=torch.float32).eval()
    processor = load_processor(str(gme_dir), min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    images = [_images()[i] for i in (0, 2)]  # on the 28-pixel grid's neighbourhood and off it; both resized up
    want = gme.embed(model, processor, texts=TEXTS, images=[None] * 3, is_query=True, instruction=instruction)
    assert np.abs(encoder.encode_texts(TEXTS, role="query") - want).max() < ATOL
    want = gme.embed(model, processor, texts=[None] * 2, images=images, is_query=False)
    got = encoder.encode_images(images, role="document")
    assert np.abs(got - want).max() < ATOL
    want = gme.embed(model, processor, texts=TEXTS[:2], images=images, is_query=True, instruction=instruction)
    assert np.abs(encoder.encode_pairs(images, TEXTS[:2]) - want).max() < ATOL
    # GME's positions are 1-D: the stock forward's 3-D M-RoPE positions give other image embeddings
    stock = gme.embed(model, processor, texts=[None] * 2, images=images, is_query=False, stock_positions=True)
    assert np.abs(stock - got).max() > 1e-3
    with pytest.raises(ValueError, match="not trained for truncated"):
        MLLMEmbedder(str(gme_dir), embedder="gme", device="cpu", dim=32)


@pytest.mark.slow
def test_index_build_across_processes_with_an_mllm_embedder(qwen3_dir, world_dir, tmp_path):
    """`genret index build` under torchrun: two processes build the index one process builds, with the settings."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from genret.config import write_config_file
    from genret.pipeline import RetrievalPipeline

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun (torch's launcher) not found")
    config = tmp_path / "p.toml"
    write_config_file(config, {"name": "emb", "encoder": {
        "model": str(qwen3_dir), "backend": "mllm", "embedder": "qwen3-vl-embedding", "query_instruction": QUERY,
        "dim": 32, "device": "cpu"}, "stages": [{"type": "prefilter", "k": 5}]})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for out, launch in (("one", [sys.executable]), ("two", [torchrun, "--standalone", "--nproc_per_node", "2"])):
        done = subprocess.run(launch + ["-m", "genret.cli", "--quiet", "index", "build", str(config), "--data",
                                        str(world_dir), "--split", "test", "--out", str(tmp_path / out)],
                              capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = RetrievalPipeline.load(tmp_path / "one"), RetrievalPipeline.load(tmp_path / "two")
    for modality in ("image", "text"):
        a, b = one.gallery.index(modality), two.gallery.index(modality)
        assert a.ids == b.ids and np.allclose(a.reconstruct(a.ids), b.reconstruct(b.ids), atol=1e-5)
    assert one.gallery.index("image").reconstruct(one.gallery.index("image").ids).shape[1] == 32
    assert one.encoder.describe()["settings"]["dim"] == 32


@pytest.mark.parametrize("embedder", ["gme", "vlm2vec", "qwen3-vl-embedding"])
def test_embedders_take_the_familys_safe_dtype(real_dirs, qwen3_dir, monkeypatch, caplog, embedder):
    """The fp16 guard of MLLM.load holds for the embedders too: on a GPU without bf16 (backend.gpu_bf16, stood in
    for: this machine has none) ``auto`` loads Qwen2-VL / Qwen3-VL weights in float32, saying why, and an explicit
    float16 stands with a warning (transformers#33294)."""
    import genret.mllm.backend as backend

    folder = qwen3_dir if embedder == "qwen3-vl-embedding" else real_dirs["qwen2-vl-2b-instruct"]
    monkeypatch.setattr(backend, "gpu_bf16", lambda: False)  # a T4: CUDA without bf16
    for dtype, want in (("auto", torch.float32), ("float16", torch.float16)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="genret.mllm.backend"):
            encoder = MLLMEmbedder(str(folder), embedder=embedder, device="cpu", dtype=dtype)
        model = encoder._st if embedder == "qwen3-vl-embedding" else encoder._gme.model
        assert next(model.parameters()).dtype == want, dtype
        assert "overflow float16" in caplog.text, dtype

