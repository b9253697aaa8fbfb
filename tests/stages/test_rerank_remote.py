"""The rerank stage with ``backend = "remote"``: its candidates go to a /v1/rerank endpoint on loopback (a real HTTP
server reading and answering as vLLM does today, scoring with a local stage of the same model) and come back as the
local stage's scores; several text queries scored together match each scored alone."""

import base64
import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from genret.pipeline import EncoderConfig, PipelineConfig, RetrievalPipeline
from genret.stages.remote import RemoteRerankError
from genret.types import Item, Query


def _pipe(encoder, **rerank):
    stages = ({"type": "prefilter", "k": 5}, {"type": "rerank", "k": 5, **rerank})
    return RetrievalPipeline(PipelineConfig(name="r", encoder=EncoderConfig(model="x"), stages=stages), encoder=encoder)


def _image(url: str, folder: Path, n: int) -> str:
    head, data = url.split(",", 1)
    path = folder / f"{n}.png"
    path.write_bytes(base64.b64decode(data))
    return str(path)


def _document(doc, folder: Path, n: int) -> Item:
    """One document as vLLM reads it today: a string, or ``{"content": [parts]}`` (one document, whatever its parts;
    this server scores documents of one image)."""
    if isinstance(doc, str):
        return Item(str(n), "text", text=doc)
    (part,) = doc["content"]
    assert part["type"] == "image_url"
    return Item(str(n), "image", image=_image(part["image_url"]["url"], folder, n))


def _endpoint(stage, folder: Path, seen: list):
    """A minimal /v1/rerank server reading vLLM's current request and writing its reply
    (``vllm/entrypoints/pooling/scoring/{protocol,serving}.py`` at the commits in
    docs/notes/issue-26-serve-vllm.md: ``id``, ``model``, ``usage``, ``results`` sorted by score and cut at ``top_n``
    unless it is 0, each with ``index``, ``document`` ``{"text", "multi_modal"}`` and ``relevance_score``), scoring
    with ``stage``."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if body["model"] != "mini":
                self.send_response(404)
                self.end_headers()
                self.wfile.write(b'{"error": "unknown model"}')
                return
            q, docs = body["query"], body["documents"]
            docs = docs if isinstance(docs, list) else [docs]
            query = Query(id="q", text=q) if isinstance(q, str) else \
                Query(id="q", image=_image(q["content"][0]["image_url"]["url"], folder, 999))
            items = [_document(d, folder, i) for i, d in enumerate(docs)]
            scores = stage.score(query, items, cache=False)
            results = sorted(({"index": i, "relevance_score": s,
                               "document": {"text": d, "multi_modal": None} if isinstance(d, str)
                               else {"text": None, "multi_modal": d["content"]}} for i, (d, s) in enumerate(zip(docs, scores))),
                             key=lambda r: -r["relevance_score"])
            top_n = body.get("top_n", 0)
            out = {"id": "rerank-0", "model": body["model"], "usage": {"prompt_tokens": 7, "total_tokens": 7},
                   "results": results[:top_n] if 0 < top_n < len(docs) else results}
            data = json.dumps(out).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return ThreadingHTTPServer(("127.0.0.1", 0), Handler)


@pytest.mark.parametrize("mode", ["generative", "pointwise"])
def test_remote_stage_gives_the_local_scores(encoder, world, mllm_dir, mode):
    test = world.split("test")
    local = _pipe(encoder, model=str(mllm_dir), mode=mode)
    local.index(test, progress=False)
    seen: list = []
    with tempfile.TemporaryDirectory() as tmp:
        server = _endpoint(local.stages[1], Path(tmp), seen)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/v1/rerank"
            remote = _pipe(encoder, model="mini", mode=mode, backend="remote", url=url)
            remote.index(test, progress=False)
            recs = test.records[:3]
            queries = [Query(id=f"t{i}", text=r.captions[0]) for i, r in enumerate(recs)]
            queries.append(Query(id="i", image=str(recs[0].path)))
            got, want = dict(remote.run(queries))["rerank"], dict(local.run(queries))["rerank"]
            for g, w in zip(got, want):
                assert g.ids == w.ids
                assert [c.scores["rerank"] for c in g.candidates] == pytest.approx(
                    [c.scores["rerank"] for c in w.candidates], abs=1e-4)
            assert len(seen) == 4 and seen[0]["top_n"] == 5 and len(seen[0]["documents"]) == 5
            # vLLM's current shape: each image a document of its own, never several in one {"content": [...]}.
            assert all(len(d["content"]) == 1 and d["content"][0]["type"] == "image_url" for d in seen[0]["documents"])
            assert all(isinstance(d, str) for d in seen[3]["documents"]) and len(seen[3]["query"]["content"]) == 1
            # The local stage scored its three text queries in one call: the same as each alone.
            for q, w in zip(queries[:3], want):
                alone = dict(local.run([q]))["rerank"][0]
                assert [c.scores["rerank"] for c in alone.candidates] == pytest.approx(
                    [c.scores["rerank"] for c in w.candidates], abs=1e-4)
            wrong = _pipe(encoder, model="other", mode=mode, backend="remote", url=url)
            wrong.index(test, progress=False)
            with pytest.raises(RemoteRerankError, match="HTTP 404: .*unknown model"):
                wrong.run(queries[:1])
        finally:
            server.shutdown()


def test_remote_stage_errors_name_the_endpoint(encoder, world):
    with pytest.raises(ValueError, match="url = 'http"):
        _pipe(encoder, model="m", backend="remote")
    pipe = _pipe(encoder, model="m", backend="remote", url="http://127.0.0.1:9/v1/rerank", timeout=2)
    pipe.index(world.split("test"), progress=False)
    with pytest.raises(RemoteRerankError, match=r"127\.0\.0\.1:9/v1/rerank: cannot reach"):
        pipe.run([Query(id="q", text="a red circle")])
    keyed = _pipe(encoder, model="m", backend="remote", url="http://127.0.0.1:9/v1/rerank",
                  api_key_env="GENRET_TEST_UNSET_KEY")
    keyed.index(world.split("test"), progress=False)
    with pytest.raises(RemoteRerankError, match="GENRET_TEST_UNSET_KEY"):
        keyed.run([Query(id="q", text="a red circle")])
