"""``POST /v1/embeddings`` on a pipeline whose prefilter is an instructed MLLM embedder (shrunk Qwen3-VL-Embedding,
real tokenizer and template, random weights), served by a real uvicorn on loopback: each input is embedded as the
request's ``role`` (``query`` unless it says ``document``), exactly as ``encode_texts`` / ``encode_images`` embed
it; a CLIP-like encoder embeds both roles alike; any other role is the one error shape, a 400."""

import base64
import copy

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
from conftest import assert_error  # noqa: E402
from embedder_checkpoints import shared_qwen3_vl_embedding  # noqa: E402

from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline  # noqa: E402
from genret.serve.app import create_app  # noqa: E402
from genret.types import Item  # noqa: E402

QUERY = "Retrieve images or text relevant to the user's query"


def b64(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def small_pipe(encoder, config: EncoderConfig, world) -> RetrievalPipeline:
    """A prefilter over two gallery images and two captions of the tiny world, with ``encoder``."""
    recs = world.split("test").records[:2]
    pipe = RetrievalPipeline(PipelineConfig(name="roles", encoder=config, stages=({"type": "prefilter", "k": 2},)),
                             encoder=encoder)
    pipe.index_items({"image": [Item(r.id, "image", image=str(r.path)) for r in recs],
                      "text": [Item(f"{r.id}-c", "text", text=r.captions[0]) for r in recs]}, {"name": "roles"},
                     progress=False)
    return pipe


@pytest.fixture(scope="module")
def mllm_pipe(tmp_path_factory, world):
    from genret.encoders.mllm import MLLMEmbedder

    folder = shared_qwen3_vl_embedding(tmp_path_factory)  # built once per session (tests/encoders reads it too)
    # the authors' default instruction is one for both roles; the README's retrieval one for queries sets them apart
    encoder = MLLMEmbedder(str(folder), embedder="qwen3-vl-embedding", device="cpu", query_instruction=QUERY)
    config = EncoderConfig(model=str(folder), backend="mllm", embedder="qwen3-vl-embedding", query_instruction=QUERY)
    return small_pipe(encoder, config, world)


def embed(url: str, inputs: list, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"input": inputs, **extra}, timeout=60)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["data"]], dtype=np.float32)


def test_embeddings_take_a_role_with_an_mllm_embedder(mllm_pipe, world, loopback):
    rec = world.split("test").records[2]  # not in the gallery
    text, image = rec.captions[0], str(rec.path)
    encoder = mllm_pipe.encoder
    want = {role: np.stack([encoder.encode_texts([text], role=role)[0], encoder.encode_images([image], role=role)[0]])
            for role in ("query", "document")}
    # the roles' instructions differ, so each role's vectors are its own (else the test could not tell them apart)
    assert np.abs(want["query"] - want["document"]).max() > 1e-2
    inputs = [text, {"type": "image_url", "image_url": {"url": b64(image)}}]
    with loopback(create_app(mllm_pipe)) as server:
        for role in ("query", "document"):
            assert np.abs(vectors(embed(server.url, inputs, role=role)) - want[role]).max() < 1e-5, role
        # unset: a query, what a client compares against the gallery (as the prefilter embeds a search)
        assert np.abs(vectors(embed(server.url, inputs)) - want["query"]).max() < 1e-5
        # a document embeds as the gallery was indexed
        index = mllm_pipe.gallery.index("image")
        gallery = index.reconstruct([index.ids[0]])[0]
        first = world.split("test").records[0]
        got = vectors(embed(server.url, [{"type": "image_url", "image_url": {"url": b64(first.path)}}],
                            role="document"))[0]
        assert np.abs(got - gallery).max() < 1e-5
        for bad in ("passage", "Query", ""):
            assert_error(embed(server.url, inputs, role=bad), 400, f"role must be 'query' or 'document' (or left "
                                                                   f"out: 'query'), got {bad!r}")
        assert embed(server.url, [text], role="document").status_code == 200  # it keeps serving


def test_a_clip_encoder_embeds_both_roles_alike(_encoder, clip_dir, world, loopback):
    pipe = small_pipe(copy.copy(_encoder), EncoderConfig(model=str(clip_dir)), world)
    rec = world.split("test").records[2]
    inputs = ["a red circle", {"type": "image_url", "image_url": {"url": b64(rec.path)}}]
    with loopback(create_app(pipe)) as server:
        got = {role: vectors(embed(server.url, inputs, role=role)) for role in ("query", "document")}
        assert_error(embed(server.url, inputs, role="passage"), 400, "role must be 'query' or 'document'")
    assert np.array_equal(got["query"], got["document"])
    want = np.stack([_encoder.encode_texts(["a red circle"])[0], _encoder.encode_images([str(rec.path)])[0]])
    assert np.abs(got["query"] - want).max() < 1e-5
