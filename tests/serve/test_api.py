"""Every endpoint of `genret serve`, and every kind of bad request, on the tiny world's pipeline (the real app through
FastAPI's test client; the remote rerank stage against a real uvicorn server on loopback)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline  # noqa: E402
from genret.serve.app import ServeConfig, create_app  # noqa: E402
from genret.types import Query  # noqa: E402


def b64(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


@pytest.fixture(scope="module")
def client(served_pipe):
    with TestClient(create_app(served_pipe, ServeConfig(max_body_bytes=200_000, max_image_pixels=128 * 128))) as c:
        yield c


def test_search_text_is_the_cli_record(client, served_pipe, world):
    rec = world.split("test").records[0]
    r = client.post("/v1/search", json={"text": rec.captions[0], "k": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    want = served_pipe.answer(Query(id="q", text=rec.captions[0]), k=4)
    assert [x["id"] for x in body["results"]] == [h.id for h in want.hits]
    assert [x["scores"]["rerank"] for x in body["results"]] == pytest.approx([h.scores["rerank"] for h in want.hits], abs=1e-4)
    assert set(body["results"][0]["scores"]) == {"prefilter", "rerank"} and body["target"] == "image"
    assert body["results"][0]["image"] == f"/v1/images/{body['results'][0]['id']}"
    assert set(body["seconds"]) == {"prefilter", "rerank"} and body["batch_size"] >= 1
    img = client.get(body["results"][0]["image"])
    assert img.status_code == 200 and img.content[:4] == b"\x89PNG"


def test_search_image_both_ways(client, world):
    rec = world.split("test").records[1]
    r = client.post("/v1/search", json={"image": b64(rec.path), "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["target"] == "text" and len(r.json()["results"]) == 3 and r.json()["query"]["image"] == "(uploaded)"
    up = client.post("/v1/search/upload", files={"file": ("q.png", open(rec.path, "rb"), "image/png")}, data={"k": "3"})
    assert up.status_code == 200, up.text
    assert [x["id"] for x in up.json()["results"]] == [x["id"] for x in r.json()["results"]]
    composed = client.post("/v1/search", json={"image": b64(rec.path), "text": "make it red", "k": 2})
    assert composed.status_code == 200 and composed.json()["target"] == "image"


def test_rerank_vllm_shape_matches_the_stage(client, served_pipe, world):
    recs = world.split("test").records[:4]
    r = client.post("/v1/rerank", json={"model": "rerank", "query": recs[0].captions[0], "top_n": 3,
                                        "documents": [{"content": [{"type": "image_url", "image_url": {"url": b64(x.path)}}]}
                                                      for x in recs]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and [x["relevance_score"] for x in results] == sorted((x["relevance_score"] for x in results), reverse=True)
    from genret.types import Item
    stage = served_pipe.stages[1]
    want = stage.score(Query(id="q", text=recs[0].captions[0]), [Item(str(i), "image", image=str(x.path)) for i, x in enumerate(recs)], cache=False)
    for x in results:
        assert x["relevance_score"] == pytest.approx(want[x["index"]], abs=1e-4)
    texts = client.post("/v1/rerank", json={"query": {"content": [{"type": "image_url", "image_url": {"url": b64(recs[0].path)}}]},
                                            "documents": [x.captions[0] for x in recs], "return_documents": True})
    assert texts.status_code == 200 and len(texts.json()["results"]) == 4 and "text" in texts.json()["results"][0]["document"]


def test_embeddings_openai_shape(client, served_pipe, world):
    rec, text = world.split("test").records[0], "a red circle left of a blue square"
    r = client.post("/v1/embeddings", json={"input": [text, {"type": "image_url", "image_url": {"url": b64(rec.path)}}]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert r.json()["object"] == "list" and [d["index"] for d in data] == [0, 1] and r.json()["model"] == "clip"
    assert np.allclose(data[0]["embedding"], served_pipe.encoder.encode_texts([text])[0], atol=1e-5)
    assert np.allclose(data[1]["embedding"], served_pipe.encoder.encode_images([str(rec.path)])[0], atol=1e-5)
    assert client.post("/v1/embeddings", json={"input": "one text"}).status_code == 200


def test_indices_health_metrics_openapi_page(client):
    idx = client.get("/v1/indices").json()
    assert {i["name"] for i in idx["indices"]} == {"image", "text"} and idx["stages"] == ["prefilter", "rerank"]
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/search", json={"text": "x", "k": 0})
    metrics = client.get("/metrics").text
    assert 'genret_requests_total{path="/v1/search",status="200"}' in metrics
    assert 'genret_errors_total{path="/v1/search",status="400"}' in metrics
    assert "genret_batch_size_bucket" in metrics and "genret_request_seconds_bucket" in metrics
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.") and {"/v1/search", "/v1/rerank", "/v1/embeddings"} <= set(schema["paths"])
    for docs in ("/docs", "/redoc"):  # their pages load from a CDN: not served
        assert client.get(docs).status_code == 404
    page = client.get("/")
    assert "<title>genret</title>" in page.text and "<script>" not in page.text and "style=" not in page.text
    assert client.get("/page.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/page.css").headers["content-type"].startswith("text/css")


def _png(size) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("body, status, match", [
    ({"k": 3}, 400, "give a query"),
    ({"text": "   ", "k": 3}, 400, "give a query"),
    ({"text": "a red circle", "k": 0}, 400, "k must be between 1 and"),
    ({"text": "a red circle", "k": 10_000}, 400, "k must be between 1 and"),
    ({"text": "a red circle", "k": "many"}, 422, "k: "),
    ({"image": "https://example.com/cat.png"}, 400, "does not fetch URLs"),
    ({"image": "not base64 !!"}, 400, "not valid base64"),
    ({"image": base64.b64encode(b"GIF89a corrupt").decode()}, 400, "not a readable image"),
    ({"image": base64.b64encode(_png((300, 300))).decode()}, 413, "above the server's limit"),
    ({"text": "a", "target": "video"}, 422, "target"),
])
def test_bad_searches_are_4xx_json_that_say_what_to_fix(client, body, status, match):
    r = client.post("/v1/search", json=body)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"]


def test_other_bad_requests(client, world):
    rec = world.split("test").records[0]
    big = client.post("/v1/search", content=b"{" + b" " * 300_000 + b"}", headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "above the server's limit" in big.json()["error"]["message"]
    assert client.post("/v1/search", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    r = client.post("/v1/rerank", json={"model": "nope", "query": "q", "documents": ["a"]})
    assert r.status_code == 404 and "use one of: rerank" in r.json()["error"]["message"]
    r = client.post("/v1/rerank", json={"query": "a red circle", "documents": ["a caption"]})
    assert r.status_code == 400 and "ranks image documents" in r.json()["error"]["message"]
    r = client.post("/v1/rerank", json={"query": "q", "documents": []})
    assert r.status_code == 400 and "between 1 and" in r.json()["error"]["message"]
    assert client.get("/v1/images/../../etc/passwd").status_code == 404
    r = client.get("/v1/images/not-an-id")
    assert r.status_code == 404 and "no gallery image" in r.json()["error"]["message"]
    up = client.post("/v1/search/upload", files={"file": ("x.png", b"corrupt", "image/png")})
    assert up.status_code == 400 and "file 'x.png'" in up.json()["error"]["message"]
    # The server keeps serving after each of those.
    assert client.post("/v1/search", json={"text": rec.captions[0], "k": 2}).status_code == 200


def test_remote_stage_against_genret_serve(served_pipe, world, _encoder, loopback):
    import copy

    test = world.split("test")
    with loopback(create_app(served_pipe)) as server:
        stages = ({"type": "prefilter", "k": 8}, {"type": "rerank", "name": "rerank", "model": "rerank", "k": 5,
                                                  "backend": "remote", "url": server.url + "/v1/rerank"})
        remote = RetrievalPipeline(PipelineConfig(name="r", encoder=EncoderConfig(model="x"), stages=stages),
                                   encoder=copy.copy(_encoder))
        remote.index(test, progress=False)
        queries = [Query(id="t", text=test.records[0].captions[0]), Query(id="i", image=str(test.records[1].path))]
        got, want = dict(remote.run(queries))["rerank"], dict(served_pipe.run(queries))["rerank"]
        for g, w in zip(got, want):
            assert g.ids == w.ids
            assert [c.scores["rerank"] for c in g.candidates] == pytest.approx([c.scores["rerank"] for c in w.candidates], abs=1e-4)


def test_every_file_the_page_needs_travels_in_the_wheel():
    """The wheel's package data lists every file of genret/serve/ that is not Python (the page, its script and
    style): a new one missing from pyproject.toml would be a page without its code once installed."""
    import fnmatch
    import tomllib
    from pathlib import Path

    import genret.serve

    root = Path(genret.serve.__file__).parent
    pyproject = tomllib.loads((Path(genret.serve.__file__).parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["genret.serve"]
    assets = [p.name for p in root.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    assert {"page.html", "page.js", "page.css"} <= set(assets)
    assert all(any(fnmatch.fnmatch(a, pat) for pat in patterns) for a in assets), (assets, patterns)


def test_a_requests_instruction_reaches_the_stages(client, served_pipe, world):
    """The optional ``instruction`` of /v1/search and /v1/rerank travels as Query.instruction: a pipeline none of
    whose stages takes one (a generative rerank here) says so with a 400 instead of dropping it."""
    rec = world.split("test").records[0]
    r = client.post("/v1/search", json={"text": rec.captions[0], "k": 4, "instruction": "Find the photo."})
    assert r.status_code == 400 and "no stage of this pipeline takes one" in r.text, r.text
    r = client.post("/v1/rerank", json={"query": rec.captions[0], "documents": [{"content": [
        {"type": "image_url", "image_url": {"url": b64(rec.path)}}]}], "instruction": "Find the photo."})
    assert r.status_code == 400 and "no {instruction} placeholder" in r.text, r.text
    for route in ("/score", "/v1/score"):  # vLLM's /score takes one too (it was dropped, unknown to the schema)
        r = client.post(route, json={"queries": rec.captions[0], "documents": [{"content": [
            {"type": "image_url", "image_url": {"url": b64(rec.path)}}]}], "instruction": "Find the photo."})
        assert r.status_code == 400 and "no {instruction} placeholder" in r.text, (route, r.text)
    assert client.post("/v1/search", json={"text": rec.captions[0], "k": 4, "instruction": " "}).status_code == 200
