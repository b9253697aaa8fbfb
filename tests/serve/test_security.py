"""What `genret serve` promises on every request: the API key on every path but the public ones, the security headers
and the one error shape on every answer, the body limit counted as the body arrives, each request's images its own,
and no server path in any answer (the real app: FastAPI's test client, and uvicorn on loopback where the wire
matters)."""

import base64
import io
import json
import re
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from fastapi.routing import APIRoute  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from conftest import assert_error  # noqa: E402

from genret.serve.app import ServeConfig, create_app  # noqa: E402
from genret.serve.auth import PUBLIC  # noqa: E402
from genret.serve.middleware import SECURITY_HEADERS  # noqa: E402

KEY = "k3y-for-tests_0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


def b64(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def png(colour, size=(32, 32)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def spool_empties(app, seconds: float = 5) -> bool:
    """Whether the app's spool holds no request folder within ``seconds`` (a request's folder is removed just after
    its answer is sent)."""
    for _ in range(int(seconds / 0.05)):
        if not any(app.state.spool.folder.iterdir()):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def keyed(served_pipe):
    app = create_app(served_pipe, ServeConfig(api_key=KEY, max_body_bytes=300_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield app, c


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def test_every_route_but_the_public_ones_needs_the_key(keyed):
    app, client = keyed
    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    assert {r.path for r in routes} >= {"/v1/search", "/v1/search/upload", "/v1/rerank", "/v1/embeddings",
                                        "/v1/indices", "/v1/images/{item_id:path}", "/metrics", "/openapi.json",
                                        "/health", "/"}
    checked = 0
    for route in app.routes:  # every route there is, the ones added later included
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            path = _concrete(route.path)
            if route.path in PUBLIC:
                assert client.request(method, path).status_code == 200
                continue
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                            {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
                            {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": "Bearer"},
                            {"Authorization": ("Bearer " + "é" * len(KEY)).encode("latin-1")}):
                # A body that would not even parse: the key is checked before the body is read.
                assert_error(client.request(method, path, headers=headers, content=b"{not json"), 401, "API key")
                checked += 1
    assert checked >= 8 * 8
    assert client.get("/v1/indices", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    # Paths no route serves, and the docs pages that are not served, say nothing without the key either.
    for path in ("/nope", "/docs", "/redoc", "/v1", "/v1/images/", "/health/x"):
        assert_error(client.get(path), 401)


def test_a_route_added_later_needs_the_key_too(served_pipe):
    app = create_app(served_pipe, ServeConfig(api_key=KEY))

    @app.get("/v1/added")
    async def added() -> dict:
        return {"secret": 1}

    from starlette.routing import Mount

    app.router.routes.append(Mount("/mounted", app=lambda scope, receive, send: None))  # not even a FastAPI route
    with TestClient(app) as client:
        assert_error(client.get("/v1/added"), 401)
        assert_error(client.get("/mounted/x"), 401)
        assert client.get("/v1/added", headers=AUTH).json() == {"secret": 1}


def test_security_headers_and_one_error_shape_on_every_answer(keyed):
    app, client = keyed

    @app.get("/v1/boom")  # an error no handler expects, in a file under this machine's temp folder
    async def boom():
        raise RuntimeError(f"failed reading {shutil.__file__} and /tmp/genret-secret/x.png")

    answers = {
        "ok": client.get("/v1/indices", headers=AUTH),
        "page": client.get("/"),
        "script": client.get("/page.js"),
        "image": client.get(_first_image(client), headers=AUTH),
        "401": client.get("/metrics"),
        "404": client.get("/v1/nope", headers=AUTH),
        "405": client.delete("/v1/search", headers=AUTH),
        "413": client.post("/v1/search", headers=AUTH, content=b"x" * 400_000),
        "422": client.post("/v1/search", headers={**AUTH, "Content-Type": "application/json"}, content=b"{not json"),
        "400": client.post("/v1/search", headers=AUTH, json={"k": 3}),
        "500": client.get("/v1/boom", headers=AUTH),
    }
    for name, response in answers.items():
        for header, value in SECURITY_HEADERS.items():
            assert response.headers.get(header) == value, (name, header)
        if name.isdigit():
            body = assert_error(response, int(name))
            assert "/tmp" not in body["error"]["message"] and "Traceback" not in response.text
    assert "default-src 'none'" in SECURITY_HEADERS["content-security-policy"]
    assert "unsafe-inline" not in SECURITY_HEADERS["content-security-policy"]
    assert answers["405"].headers["allow"] == "POST" and "use POST" in answers["405"].json()["error"]["message"]
    assert "no route GET /v1/nope" in answers["404"].json()["error"]["message"]


def _first_image(client) -> str:
    r = client.post("/v1/search", headers=AUTH, json={"text": "a red circle", "k": 1})
    return r.json()["results"][0]["image"]


def test_metrics_label_requests_by_route_not_by_path(keyed):
    app, client = keyed
    for i in range(5):
        client.get(f"/v1/images/unknown-{i}", headers=AUTH)
        client.get(f"/random-{i}", headers=AUTH)
    metrics = client.get("/metrics", headers=AUTH).text
    assert 'path="/v1/images/{item_id:path}",status="404"' in metrics and "unknown-" not in metrics
    assert "random-" not in metrics and 'path="(unmatched)"' in metrics


@pytest.mark.parametrize("route, make_body", [
    ("/v1/search", lambda n: json.dumps({"text": "a red circle", "k": 2, "pad": "x" * n}).encode()),
    ("/v1/embeddings", lambda n: json.dumps({"input": ["a"] * (n // 6)}).encode()),
    ("/v1/rerank", lambda n: json.dumps({"query": "q", "documents": ["a"] * (n // 6)}).encode()),
])
def test_body_limit_is_counted_as_the_body_arrives(served_pipe, loopback, route, make_body):
    limit = 50_000
    with loopback(create_app(served_pipe, ServeConfig(max_body_bytes=limit))) as server:
        url = server.url + route
        big, small = make_body(limit * 4), json.dumps({"text": "a red circle", "k": 2}).encode()

        def chunks(data, size=8192):
            for i in range(0, len(data), size):
                yield data[i:i + size]

        with httpx.Client(timeout=30) as http:
            # Chunked transfer: no Content-Length at all.
            r = http.post(url, content=chunks(big), headers={"Content-Type": "application/json"})
            assert_error(r, 413, "above the server's limit of 50,000 bytes")
            assert "transfer-encoding" not in r.request.headers or r.request.headers["transfer-encoding"] == "chunked"
            # A Content-Length above the limit: answered before the body is read.
            assert_error(http.post(url, content=big, headers={"Content-Type": "application/json"}), 413)
            # A chunked body under the limit is served.
            if route == "/v1/search":
                ok = http.post(url, content=chunks(small, 7), headers={"Content-Type": "application/json"})
                assert ok.status_code == 200, ok.text
        # A multipart upload sent chunked, past the limit.
        boundary = "xyz"
        form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + b"\0" * (limit * 3) + f"\r\n--{boundary}--\r\n".encode()
        with httpx.Client(timeout=30) as http:
            r = http.post(server.url + "/v1/search/upload", content=chunks(form),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            assert_error(r, 413)
        with httpx.Client(timeout=30) as http:  # still serving
            assert http.get(server.url + "/health").status_code == 200


def test_concurrent_embeddings_each_keep_their_own_images(served_pipe, loopback):
    """Requests at once with many images each (more than any fixed spool could keep), some shared between them and
    some twice in one request: every one gets its own vectors, and nothing is left in the spool afterwards."""
    datas = [png((i % 256, i // 256 * 40, 255 - i % 256), (8, 8)) for i in range(600)]
    want = served_pipe.encoder.encode_images([Image.open(io.BytesIO(d)).convert("RGB") for d in datas])
    app = create_app(served_pipe, ServeConfig(max_wait_ms=20))
    results, errors = {}, []

    def client(n: int, url: str):
        picks = [n * 150 + j for j in range(150)] + [0, 0, 599]  # 0 and 599 in every request, 0 twice
        body = {"input": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," +
                                                                     base64.b64encode(datas[p]).decode()}}
                          for p in picks]}
        try:
            r = httpx.post(url + "/v1/embeddings", json=body, timeout=120)
            results[n] = (picks, r.status_code, r.json())
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    with loopback(app) as server:
        threads = [threading.Thread(target=client, args=(n, server.url)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert spool_empties(app)  # every request's folder removed when it ended
    assert not app.state.spool.folder.exists()  # and the spool with the server
    assert not errors and len(results) == 4
    for picks, status, body in results.values():
        assert status == 200, body
        got = np.array([d["embedding"] for d in body["data"]])
        assert np.allclose(got, want[picks], atol=1e-5)


def test_spooled_files_are_removed_when_a_request_fails(served_pipe):
    app = create_app(served_pipe)
    with TestClient(app) as client:
        good = "data:image/png;base64," + base64.b64encode(png("red")).decode()
        r = client.post("/v1/rerank", json={"query": "a red circle", "documents": [
            {"type": "image_url", "image_url": {"url": good}}, {"type": "text", "text": "not an image"}]})
        assert_error(r, 400, "ranks image documents")
        assert spool_empties(app)


class Recorder(TestClient):
    """A test client that keeps every answer."""

    answers: list

    def request(self, *args, **kwargs):
        response = super().request(*args, **kwargs)
        self.answers.append(response)
        return response


def test_no_server_path_in_any_answer(served_pipe, world, tmp_path_factory, clip_dir, mllm_dir):
    rec = world.split("test").records[0]
    app = create_app(served_pipe, ServeConfig(api_key=KEY, max_body_bytes=300_000, max_image_pixels=128 * 128))
    client = Recorder(app, raise_server_exceptions=False)
    client.answers = []
    with client:
        missing = str(rec.path) + ".missing.png"
        image = b64(rec.path)
        for method, path, kwargs in [
            ("GET", "/v1/indices", {}), ("GET", "/openapi.json", {}), ("GET", "/health", {}), ("GET", "/metrics", {}),
            ("POST", "/v1/search", {"json": {"text": "a red circle", "k": 3}}),
            ("POST", "/v1/search", {"json": {"image": image, "k": 3}}),
            ("POST", "/v1/search", {"json": {"image": missing}}),
            ("POST", "/v1/search", {"json": {"image": "file://" + missing}}),
            ("POST", "/v1/search", {"json": {"text": "x", "target": "text"}}),
            ("POST", "/v1/search/upload", {"files": {"file": ("/etc/passwd", b"corrupt", "image/png")}}),
            ("POST", "/v1/embeddings", {"json": {"input": ["a red circle", {"type": "image_url",
                                                                             "image_url": {"url": image}}]}}),
            ("POST", "/v1/embeddings", {"json": {"input": [{"type": "image_url", "image_url": {"url": missing}}]}}),
            ("POST", "/v1/rerank", {"json": {"query": "a red circle", "documents": {"content": [
                {"type": "image_url", "image_url": {"url": image}}]}}}),
            ("POST", "/v1/rerank", {"json": {"model": str(mllm_dir), "query": "q", "documents": ["a"]}}),
            ("GET", "/v1/images/" + rec.id, {}), ("GET", "/v1/images/" + missing, {}),
            ("GET", "/v1" + str(clip_dir), {}), ("POST", "/v1/embeddings", {"content": b"x" * 400_000}),
        ]:
            client.request(method, path, headers=AUTH, **kwargs)
        client.get("/v1/indices")  # without the key
    assert len(client.answers) == 19
    forbidden = {str(clip_dir), str(mllm_dir), str(world.source.parent), str(app.state.spool.folder),
                 str(tmp_path_factory.getbasetemp()), "/tmp/", "/root"}
    for response in client.answers:
        text = response.text if not response.headers.get("content-type", "").startswith("image/") else ""
        for path in forbidden:
            assert path not in text, (response.request.url, path, text[:300])
    indices = client.answers[0].json()["indices"]
    assert {i["encoder"]["model"] for i in indices} == {"clip"}
