"""`genret serve` speaks vLLM's rerank and score API as vLLM reads it today (documents as strings and
``{"content": [parts]}`` objects, one document each; ``/score`` with queries and documents in 1:1, 1:N or N:N pairs) and
genret's older shape (bare parts, one document each), answers in vLLM's shape (``id``, ``model``, ``usage``,
``results[].document``), refuses a request that could be read two ways with a 400 saying how to write it, and keeps
its key, image checks and limits on every one of those routes. All against a real uvicorn server on loopback."""

import base64
import io
import json
import re

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from conftest import Server, assert_error  # noqa: E402

from genret.serve.app import ServeConfig, create_app  # noqa: E402
from genret.types import Item, Query  # noqa: E402

KEY = "k3y-for-vllm-shapes_0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def b64(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def image(path) -> dict:
    return {"type": "image_url", "image_url": {"url": b64(path)}}


@pytest.fixture(scope="module")
def served(served_pipe):
    app = create_app(served_pipe, ServeConfig(api_key=KEY, max_body_bytes=300_000, max_image_pixels=128 * 128))
    with Server(app) as server, httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        yield client, app


@pytest.fixture(scope="module")
def recs(world):
    return world.split("test").records[:4]


@pytest.fixture(scope="module")
def want(served_pipe, recs):
    """The stage's own scores: the first caption against the four images, the first image against four captions."""
    stage = served_pipe.stages[1]
    t2i = stage.score(Query(id="q", text=recs[0].captions[0]),
                      [Item(str(i), "image", image=str(r.path)) for i, r in enumerate(recs)], cache=False)
    i2t = stage.score(Query(id="q", image=str(recs[0].path)),
                      [Item(str(i), "text", text=r.captions[0]) for i, r in enumerate(recs)], cache=False)
    return t2i, i2t


def prompt_tokens(stage, direction: str, texts, images) -> int:
    """The tokens of each (text, image) pair's whole generative prompt, as the stage's processor makes it (what vLLM
    counts as a pair's prompt tokens)."""
    from genret.data.images import load_image
    from genret.mllm import scoring
    from genret.mllm.answers import answer_format

    section, mllm = stage.prompt.section(direction), stage.mllm
    prompt, fmt = scoring.render(mllm, scoring.user_message(section["user"])), answer_format(mllm)
    return sum(mllm.processor(text=[prompt + fmt.text(section["assistant"].replace("{text}", t))],
                              images=[load_image(i)], return_tensors="pt")["input_ids"].shape[1]
               for t, i in zip(texts, images))


def calls(client) -> float:
    """Model calls so far (the batcher's metrics)."""
    return sum(float(v) for v in re.findall(r'genret_batch_size_count\{kind="\w+"\} (\S+)', client.get("/metrics").text))


def by_index(body: dict) -> dict[int, float]:
    return {r["index"]: r["relevance_score"] for r in body["results"]}


def test_rerank_reads_each_shape_and_answers_as_vllm(served, served_pipe, recs, want):
    client, _ = served
    t2i, i2t = want
    query = recs[0].captions[0]
    stage = served_pipe.stages[1]
    tokens = prompt_tokens(stage, "t2i", [query] * 4, [r.path for r in recs])
    shapes = {  # name: (documents, the document vLLM would echo for each)
        "current": [{"content": [image(r.path)]} for r in recs],
        "older, bare parts": [image(r.path) for r in recs],
        "a list of both": [{"content": [image(r.path)]} if i % 2 else image(r.path) for i, r in enumerate(recs)],
    }
    for name, documents in shapes.items():
        r = client.post("/v1/rerank", json={"model": "rerank", "query": query, "documents": documents})
        assert r.status_code == 200, (name, r.text)
        body = r.json()
        assert set(body) == {"id", "model", "usage", "results"} and body["id"].startswith("rerank-"), name
        assert body["model"] == "rerank" and set(body["usage"]) == {"prompt_tokens", "total_tokens"}
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens, name
        assert len(body["results"]) == 4, name  # no top_n: all, as vLLM
        scores = [x["relevance_score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert [by_index(body)[i] for i in range(4)] == pytest.approx(t2i, abs=1e-4), name
        for x in body["results"]:
            assert set(x) == {"index", "document", "relevance_score"}
            assert x["document"] == {"text": None, "multi_modal": [image(recs[x["index"]].path)]}, name
    # An image query ranks texts: strings, text documents and bare text parts, together.
    documents = [recs[0].captions[0], {"content": [{"type": "text", "text": recs[1].captions[0]}]},
                 {"type": "text", "text": recs[2].captions[0]}, recs[3].captions[0]]
    r = client.post("/rerank", json={"query": {"content": [image(recs[0].path)]}, "documents": documents, "top_n": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 4  # top_n = 0: all
    assert body["usage"]["prompt_tokens"] == prompt_tokens(stage, "i2t", [r.captions[0] for r in recs], [recs[0].path] * 4)
    assert [by_index(body)[i] for i in range(4)] == pytest.approx(i2t, abs=1e-4)
    echo = {x["index"]: x["document"] for x in body["results"]}
    assert echo[0] == {"text": recs[0].captions[0], "multi_modal": None}
    assert echo[1] == {"text": None, "multi_modal": [{"type": "text", "text": recs[1].captions[0]}]}
    assert echo[2] == {"text": recs[2].captions[0], "multi_modal": None}
    # top_n cuts to the best; the other routes answer alike; a lone one-part object is one document.
    top = client.post("/v2/rerank", json={"query": query, "documents": shapes["current"], "top_n": 2}).json()
    assert [x["index"] for x in top["results"]] == sorted(range(4), key=lambda i: -t2i[i])[:2]
    lone = client.post("/v1/rerank", json={"query": query, "documents": {"content": [image(recs[1].path)]}}).json()
    assert [(x["index"], pytest.approx(x["relevance_score"], abs=1e-4)) for x in lone["results"]] == [(0, t2i[1])]
    bare = client.post("/v1/rerank", json={"query": query, "documents": shapes["current"], "return_documents": False})
    assert "document" not in bare.json()["results"][0]


def test_score_pairs_queries_and_documents_as_vllm(served, served_pipe, recs, want):
    client, _ = served
    t2i, i2t = want
    one_to_many = {"queries": recs[0].captions[0], "documents": [{"content": [image(r.path)]} for r in recs]}
    r = client.post("/score", json=one_to_many)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage"} and body["object"] == "list"
    assert body["id"].startswith("score-") and body["model"] == "rerank" and isinstance(body["created"], int)
    assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(4)]
    assert [d["score"] for d in body["data"]] == pytest.approx(t2i, abs=1e-4)  # in the documents' order
    assert set(body["usage"]) == {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"}
    tokens = prompt_tokens(served_pipe.stages[1], "t2i", [recs[0].captions[0]] * 4, [r.path for r in recs])
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == tokens
    assert body["usage"]["completion_tokens"] == 0
    # The older names read alike, and /v1/score too.
    for names in (("text_1", "text_2"), ("data_1", "data_2"), ("queries", "items")):
        other = {names[0]: one_to_many["queries"], names[1]: one_to_many["documents"]}
        got = client.post("/v1/score", json=other).json()
        assert [d["score"] for d in got["data"]] == pytest.approx(t2i, abs=1e-4), names
    # N:N: the i-th query with the i-th document, both directions in one request.
    pairs = {"queries": [recs[2].captions[0], recs[0].captions[0], {"content": [image(recs[0].path)]}],
             "documents": [{"content": [image(recs[2].path)]}, image(recs[3].path), recs[1].captions[0]]}
    got = client.post("/score", json=pairs).json()
    stage_alone = client.post("/score", json={"queries": recs[2].captions[0],
                                              "documents": {"content": [image(recs[2].path)]}}).json()
    assert [d["score"] for d in got["data"]] == pytest.approx(
        [stage_alone["data"][0]["score"], t2i[3], i2t[1]], abs=1e-4)


IMG = {"type": "image_url", "image_url": {"url": "IMAGE"}}
TWO_WAYS = [
    ("/v1/rerank", {"query": "q", "documents": {"content": [IMG, IMG]}}, "could be read two ways: one document of 2"),
    ("/v1/rerank", {"query": "q", "documents": [{"content": [IMG], **IMG}]}, "could be read two ways; send one"),
    ("/score", {"text_1": "q", "text_2": [IMG], "documents": [IMG]}, "could be read two ways"),
    ("/score", {"queries": "q", "text_2": [IMG]}, "could be read two ways"),
    ("/score", {"queries": "q", "documents": {"content": [IMG, IMG]}}, "could be read two ways"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": "a caption"}]}, "neither a document"),
    ("/v1/rerank", {"query": "q", "documents": [{}]}, "neither a document"),
    ("/v1/rerank", {"query": "q", "documents": IMG}, "a bare part outside a list"),
    ("/v1/rerank", {"query": "q", "documents": [{**IMG, "text": "a caption"}]},
     "documents[0]: an image_url part does not use 'text'"),
    ("/score", {"queries": "q", "documents": [{"content": [{"type": "text", "text": "a", **{"image_url": IMG["image_url"]}}]}]},
     "documents[0]: a text part does not use 'image_url'"),
    ("/v1/rerank", {"query": {"content": [{**IMG, "text": "a"}]}, "documents": ["a"]},
     "query: an image_url part does not use 'text'"),
    ("/v1/rerank", {"query": "q", "documents": [{"content": []}]}, "'content' is empty"),
    ("/v1/rerank", {"query": "q", "documents": [{"content": [{"type": "text", "text": "a"}, IMG]}]},
     "documents[0]: 2 parts (text, image); stage 'rerank' scores one image per document"),
    ("/score", {"queries": ["a", "b"], "documents": [IMG, IMG, IMG]}, "1:1, 1:N or N:N"),
    ("/score", {"text_1": "q"}, "text_1 without text_2"),
    ("/score", {"model": "rerank"}, "give what to score"),
]


@pytest.mark.parametrize("route, body, match", TWO_WAYS)
def test_requests_that_could_be_read_two_ways_are_400s_saying_how_to_write_them(served, recs, route, body, match):
    client, _ = served
    before = calls(client)
    body = json.loads(json.dumps(body).replace('"IMAGE"', json.dumps(b64(recs[0].path))))
    message = assert_error(client.post(route, json=body), 400, match)["error"]["message"]
    if "two ways" in match:
        assert '[{"content": [p1]}, {"content": [p2]}]' in message or "queries + documents" in message, message
    assert calls(client) == before  # refused before any model call


def _png(size) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, "PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_image_parts_need_the_key_and_pass_the_image_checks(served, recs):
    client, app = served
    doc = {"content": [image(recs[0].path)]}
    before = calls(client)
    for route, body in [("/v1/rerank", {"query": "q", "documents": [doc]}), ("/rerank", {"query": "q", "documents": [doc]}),
                        ("/v2/rerank", {"query": "q", "documents": [doc]}), ("/score", {"queries": "q", "documents": doc}),
                        ("/v1/score", {"text_1": "q", "text_2": [doc]})]:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
            assert_error(client.post(route, json=body, headers=headers), 401, "needs its API key")
    assert calls(client) == before and not any(app.state.spool.folder.iterdir())  # nothing read, spooled or run
    for documents, status, match in [
        ([{"content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}], 400,
         "documents[0]: genret does not fetch URLs"),
        ([{"content": [{"type": "image_url", "image_url": {"url": _png((300, 300))}}]}], 413, "above the server's limit"),
        ([{"content": [{"type": "image_url", "image_url": {"url": "not base64 !!"}}]}], 400, "not valid base64"),
        ([recs[0].captions[0], {"content": [image(recs[0].path)]}], 400, "a text query ranks image documents"),
    ]:
        assert_error(client.post("/v1/rerank", json={"query": "q", "documents": documents}), status, match)
        assert_error(client.post("/score", json={"queries": "q", "documents": documents}), status, match)
    assert calls(client) == before and not any(app.state.spool.folder.iterdir())
