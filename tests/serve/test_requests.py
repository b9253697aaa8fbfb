"""What a request may hold, on every route: texts bounded in characters and in tokens (against the context of the
model that reads them, before its thread sees them), valid Unicode, a target that fits the query, and gallery
images gone from disk answered plainly; and over random and malformed bodies, never a 5xx and always the one error
shape (hypothesis)."""

import base64
import io
import json
import re
import time

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import assert_error  # noqa: E402

from genret.serve.app import ServeConfig, create_app  # noqa: E402


def b64(path) -> str:
    return "data:image/png;base64," + base64.b64encode(open(path, "rb").read()).decode()


def post(client, path, body):
    """POST ``body`` as JSON written with ``\\uXXXX`` escapes (as a lone surrogate can only travel)."""
    return client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def batches(client) -> dict[str, float]:
    """Model calls so far, by kind (the batcher's metrics)."""
    text = client.get("/metrics").text
    return {k: float(v) for k, v in re.findall(r'genret_batch_size_count\{kind="(\w+)"\} (\S+)', text)}


@pytest.fixture(scope="module")
def small(served_pipe):
    """Texts of at most 50 characters."""
    with TestClient(create_app(served_pipe, ServeConfig(max_text_chars=50)), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def roomy(served_pipe):
    """Texts of up to 100,000 characters: the token limits are what stops them."""
    with TestClient(create_app(served_pipe, ServeConfig(max_text_chars=100_000)), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def image(world):
    return b64(world.split("test").records[0].path)


LONG = "a red circle left of a blue square " * 2  # 70 characters


@pytest.mark.parametrize("route, body, field", [
    ("/v1/search", {"text": LONG, "k": 2}, "text"),
    ("/v1/rerank", {"query": LONG, "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": {"content": [{"type": "text", "text": LONG}]}, "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "IMAGE", "documents": ["short", LONG]}, "documents"),
    ("/v1/rerank", {"query": "IMAGE", "documents": {"content": [{"type": "text", "text": LONG}]}}, "documents"),
    ("/v1/embeddings", {"input": LONG}, "input"),
    ("/v1/embeddings", {"input": ["short", LONG]}, "input"),
    ("/v1/embeddings", {"input": [{"type": "text", "text": LONG}]}, "input"),
    ("/v1/rerank", {"model": "m" * 300, "query": "q", "documents": ["a"]}, "model"),
    ("/v1/embeddings", {"input": "a", "model": "m" * 300}, "model"),
])
def test_texts_past_the_character_limit_are_422_naming_the_field(small, image, route, body, field):
    body = json.loads(json.dumps(body).replace('"IMAGE"', json.dumps({"content": [
        {"type": "image_url", "image_url": {"url": image}}]})))
    r = assert_error(post(small, route, body), 422, field)
    assert "characters" in r["error"]["message"]


@pytest.mark.parametrize("route, body, field", [
    ("/v1/rerank", {"query": "q", "documents": ["a"] * 4}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": {"content": [{"type": "text", "text": "a"}] * 4}}, "documents.Document.content"),
    ("/v1/rerank", {"query": {"content": [{"type": "text", "text": "a"}] * 4}, "documents": ["a"]}, "query.Content.content"),
    ("/v1/embeddings", {"input": ["a"] * 4}, "input"),
])
def test_lists_past_max_documents_are_422_naming_the_field(served_pipe, route, body, field):
    with TestClient(create_app(served_pipe, ServeConfig(max_documents=3))) as client:
        r = assert_error(post(client, route, body), 422, field)
        assert "at most 3 items" in r["error"]["message"]
        assert post(client, "/v1/embeddings", {"input": ["a"] * 3}).status_code == 200  # at the bound


def test_the_character_limit_on_uploads_and_at_the_bound(small, world):
    rec = world.split("test").records[0]
    up = small.post("/v1/search/upload", files={"file": ("q.png", open(rec.path, "rb"), "image/png")},
                    data={"text": LONG, "k": "2"})
    assert_error(up, 422, "text: String should have at most 50 characters (--max-text-chars)")
    assert post(small, "/v1/search", {"text": LONG[:50], "k": 2}).status_code == 200


def test_a_100k_character_query_is_refused_at_once(served_pipe):
    with TestClient(create_app(served_pipe)) as client:  # the default limit
        before = batches(client)
        for route, body in [("/v1/rerank", {"query": "a" * 100_000, "documents": ["x"]}),
                            ("/v1/search", {"text": "a red circle " * 8000, "k": 3}),
                            ("/v1/embeddings", {"input": ["ok", "b" * 100_000]})]:
            start = time.perf_counter()
            assert_error(post(client, route, body), 422, "at most 4096 characters (--max-text-chars)")
            assert time.perf_counter() - start < 2
        assert batches(client) == before  # no model call


def test_texts_past_a_models_context_are_refused_before_its_thread(roomy, image):
    before = batches(roomy)
    words = " ".join(f"w{i}x{i * 7}" for i in range(3000))  # thousands of tokens in the tiny tokenizers
    cases = [("/v1/rerank", {"query": words, "documents": {"content": [{"type": "image_url", "image_url": {"url": image}}]}},
              "query: "),
             ("/v1/rerank", {"query": {"content": [{"type": "image_url", "image_url": {"url": image}}]},
                             "documents": ["a red circle", words]}, "documents[1]: "),
             ("/v1/search", {"text": words, "k": 2}, "text: ")]
    for route, body, field in cases:
        r = assert_error(post(roomy, route, body), 400, field)
        message = r["error"]["message"]
        assert "stage 'rerank'" in message and "context of 4,096" in message, message
    r = assert_error(post(roomy, "/v1/embeddings", {"input": ["a red circle", "a red circle " * 20]}), 400, "input[1]")
    assert "the encoder 'clip' reads (24 tokens" in r["error"]["message"]
    assert batches(roomy) == before
    # Just under the limits: served.
    assert post(roomy, "/v1/embeddings", {"input": ["a red circle left of a blue square"]}).status_code == 200
    assert post(roomy, "/v1/search", {"text": " ".join(words.split()[:200]), "k": 2}).status_code == 200


TEXT_FIELDS = [
    ("/v1/search", {"text": "S", "k": 2}, "text"),
    ("/v1/search", {"image": "S"}, "image"),
    ("/v1/rerank", {"query": "S", "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": {"content": [{"type": "text", "text": "S"}]}, "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": ["a", "S"]}, "documents"),
    ("/v1/rerank", {"query": "q", "documents": ["a"], "model": "S"}, "model"),
    ("/v1/rerank", {"query": "q", "documents": [{"type": "image_url", "image_url": {"url": "S"}}]}, "documents"),
    ("/v1/embeddings", {"input": "S"}, "input"),
    ("/v1/embeddings", {"input": ["a", {"type": "text", "text": "S"}]}, "input"),
    ("/v1/embeddings", {"input": "a", "model": "S"}, "model"),
]


@pytest.mark.parametrize("route, body, field", TEXT_FIELDS)
@pytest.mark.parametrize("bad", ["\ud800", "a\udfffb", "\udc00\ud800", "ok \ud83d"])
def test_lone_surrogates_are_422_naming_the_field(small, route, body, field, bad):
    body = json.loads(json.dumps(body).replace('"S"', json.dumps(bad)))
    r = assert_error(post(small, route, body), 422, field)
    assert "lone surrogate" in r["error"]["message"]


def multipart(*parts: tuple[bytes, bytes | None, bytes]) -> tuple[bytes, dict]:
    """A multipart body of (name, filename or None, value) written byte for byte (invalid UTF-8 included)."""
    out = b""
    for name, filename, value in parts:
        disposition = b'form-data; name="' + name + b'"' + (b'; filename="' + filename + b'"' if filename else b"")
        out += b"--b0undary\r\nContent-Disposition: " + disposition + b"\r\n"
        out += (b"Content-Type: image/png\r\n" if filename else b"") + b"\r\n" + value + b"\r\n"
    return out + b"--b0undary--\r\n", {"Content-Type": "multipart/form-data; boundary=b0undary"}


def test_invalid_utf8_in_a_form_or_a_body_is_a_4xx(small, world):
    png = world.split("test").records[0].path.read_bytes()
    for parts in [((b"file", b"q\xff.png", png), (b"text", None, b"a \xed\xa0\x80 b")),
                  ((b"file", b"q.png", png), (b"text\xff", None, b"x")),
                  ((b"file", b"q.png", png), (b"k", None, b"\xff"))]:
        body, headers = multipart(*parts)
        up = small.post("/v1/search/upload", content=body, headers=headers)
        assert 200 <= up.status_code < 500 and (up.status_code == 200 or set(up.json()) == {"error"}), up.text
    raw = small.post("/v1/search", content=b'{"text": "a \xed\xa0\x80 b"}', headers={"Content-Type": "application/json"})
    assert_error(raw, 422)


@pytest.mark.parametrize("body, match", [
    ({"text": "a red circle", "target": "text"}, "does not fit a text query"),
    ({"image": "IMAGE", "target": "image"}, "does not fit an image query"),
    ({"image": "IMAGE", "text": "make it red", "target": "text"}, "does not fit an image and text query"),
])
def test_a_target_that_does_not_fit_the_query_is_400_saying_which_does(small, image, body, match):
    body = {**body, "k": 2, **({"image": image} if "image" in body else {})}
    r = assert_error(post(small, "/v1/search", body), 400, match)
    assert "leave target out" in r["error"]["message"]


def test_upload_target_is_checked_too(small, world):
    rec = world.split("test").records[0]
    up = small.post("/v1/search/upload", files={"file": ("q.png", open(rec.path, "rb"), "image/png")},
                    data={"target": "image"})
    assert_error(up, 400, "does not fit an image query")


@pytest.mark.parametrize("harm", ["delete", "corrupt"])
def test_a_gallery_image_gone_after_indexing(world, make_pipe, tmp_path, harm):
    records = world.split("test").records[:4]
    folder = tmp_path / "gallery"
    folder.mkdir()
    images = {}
    for rec in records:
        images[rec.id] = folder / f"{rec.id}.png"
        images[rec.id].write_bytes(rec.path.read_bytes())
    texts = {f"{r.id}#0": r.captions[0] for r in records}
    pipe = make_pipe(images=images, texts=texts, cache_features=False)  # the rerank reads the files at each search
    gone = records[1].id
    if harm == "delete":
        images[gone].unlink()
    else:
        images[gone].write_bytes(b"\x89PNG\r\n\x1a\n not any more")
    with TestClient(create_app(pipe), raise_server_exceptions=False) as client:
        if harm == "delete":
            r = assert_error(client.get(f"/v1/images/{gone}"), 404, f"gallery image {gone!r} is no longer on the server")
            assert str(folder) not in r["error"]["message"]
        assert client.get(f"/v1/images/{records[0].id}").status_code == 200
        r = assert_error(post(client, "/v1/search", {"text": "a red circle", "k": 4}), 500, f"gallery image {gone!r}")
        assert str(folder) not in json.dumps(r) and "/tmp" not in json.dumps(r)
        # Searches that do not read that file are served.
        assert post(client, "/v1/search", {"image": b64(records[0].path), "k": 2}).status_code == 200
        assert client.get("/health").status_code == 200


def test_a_gallery_image_changed_after_indexing_is_not_served(world, make_pipe, tmp_path, _encoder):
    """Replaced by another (valid) picture under the same name: the saved gallery's content hash refuses it."""
    import copy

    from genret.pipeline import RetrievalPipeline

    records = world.split("test").records[:3]
    folder = tmp_path / "gallery"
    folder.mkdir()
    images = {rec.id: folder / f"{rec.id}.png" for rec in records}
    for rec in records:
        images[rec.id].write_bytes(rec.path.read_bytes())
    make_pipe(images=images, texts={}, rerank=False).save(tmp_path / "pipe")
    pipe = RetrievalPipeline.load(tmp_path / "pipe", encoder=copy.copy(_encoder))
    changed = records[1].id
    images[changed].write_bytes(records[2].path.read_bytes())
    with TestClient(create_app(pipe), raise_server_exceptions=False) as client:
        assert client.get(f"/v1/images/{records[0].id}").status_code == 200
        r = assert_error(client.get(f"/v1/images/{changed}"), 404, "changed after indexing")
        assert str(folder) not in json.dumps(r)


# --- random and malformed bodies ---

def json_values(text=st.text(max_size=12)):
    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | text
    return st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=8)


# Texts that now and then hold a lone surrogate, a NUL, a right-to-left mark or HTML.
TEXTS = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "a red circle", "<script>x</script>", "\x00", "\u202e",
                                                         "\ud800", "a\udfffb", "x" * 60]),
                  st.builds(lambda a, b: a + "\ud83d" + b, st.text(max_size=5), st.text(max_size=5)))
def _png(size) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "blue").save(out, "PNG")
    return out.getvalue()


PNG = "data:image/png;base64," + base64.b64encode(_png((8, 8))).decode()
IMAGES = st.sampled_from([PNG, PNG, "", "data:,", "data:image/png;base64,!!", "http://example.com/a.png", "file:///etc/passwd",
                          "iVBORw0KGgo=", "data:image/png;base64," + base64.b64encode(b"GIF89a").decode()])


def parts():
    return st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "video"])},
                                 optional={"text": TEXTS, "image_url": st.fixed_dictionaries({"url": IMAGES}) | json_values()})


def image_part():
    return st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": IMAGES})})


def content():
    return st.fixed_dictionaries({"content": st.lists(parts(), max_size=3) | json_values()})


BODIES = {
    "/v1/search": st.fixed_dictionaries({}, optional={
        "text": TEXTS | json_values(), "image": IMAGES | json_values(), "k": st.integers(-3, 200) | json_values(),
        "target": st.sampled_from(["image", "text", "video", None]) | json_values()}),
    "/v1/rerank": st.fixed_dictionaries({
        "query": TEXTS | content() | json_values() | image_part().map(lambda p: {"content": [p]}),
        "documents": st.lists(TEXTS | parts(), max_size=4) | content() | json_values() | st.lists(image_part(), max_size=3)
        | st.lists(TEXTS, max_size=3)}, optional={
        "model": st.sampled_from(["rerank", "nope", None]) | TEXTS, "top_n": st.integers(-2, 10) | json_values(),
        "return_documents": st.booleans() | json_values()}),
    "/score": st.fixed_dictionaries({}, optional={
        name: TEXTS | content() | json_values() | st.lists(TEXTS | parts() | content(), max_size=3)
        for name in ("queries", "documents", "items", "data_1", "data_2", "text_1", "text_2", "model")}),
    "/v1/embeddings": st.fixed_dictionaries({
        "input": TEXTS | st.lists(TEXTS | parts(), max_size=4) | json_values() | st.lists(image_part(), max_size=3)},
        optional={"model": TEXTS | json_values(),
        "encoding_format": st.sampled_from(["float", "base64"]) | json_values(),
        "role": st.sampled_from(["query", "document", "passage", None]) | TEXTS | json_values()}),
}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


def check_answer(response):
    from hypothesis import event
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():  # which answers the examples got: --hypothesis-show-statistics
        event(f"status {response.status_code}")
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code >= 400:
        assert_error(response, response.status_code)
    else:
        assert isinstance(response.json(), dict)


@pytest.fixture(scope="module")
def fuzzed(served_pipe):
    config = ServeConfig(max_text_chars=50, max_body_bytes=100_000, max_image_pixels=128 * 128, max_k=20)
    with TestClient(create_app(served_pipe, config), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("route", sorted(BODIES))
@FUZZ
@given(data=st.data())
def test_shaped_bodies_of_random_values_are_never_a_5xx(fuzzed, route, data):
    check_answer(post(fuzzed, route, data.draw(BODIES[route], label="body")))


@pytest.mark.parametrize("route", ["/v1/search", "/v1/rerank", "/v1/embeddings", "/v1/search/upload"])
@settings(FUZZ, max_examples=40)
@given(body=json_values() | st.binary(max_size=64),
       content_type=st.sampled_from(["application/json", "text/plain", "multipart/form-data", "",
                                     "application/x-www-form-urlencoded"]))
def test_any_json_or_bytes_is_never_a_5xx(fuzzed, route, body, content_type):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    check_answer(fuzzed.post(route, content=data, headers={"Content-Type": content_type} if content_type else {}))


@FUZZ
@given(file=st.binary(max_size=64) | st.sampled_from([_png((8, 8)), _png((300, 300))]),
       name=st.binary(max_size=10) | st.just(b"../../etc/passwd"),
       fields=st.dictionaries(st.sampled_from([b"text", b"k", b"target", b"other", b"file"]),
                              TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=10), max_size=3))
def test_random_uploads_are_never_a_5xx(fuzzed, file, name, fields):
    body, headers = multipart((b"file", name.replace(b'"', b"") or b"x", file), *((k, None, v) for k, v in fields.items()))
    check_answer(fuzzed.post("/v1/search/upload", content=body, headers=headers))


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b'{"text": ' * 5000 + b"1" + b"}" * 5000,
                                  b'{"text": "a", "k": 1' + b"0" * 5000 + b"}", b'{"k": 1e999, "text": "a"}',
                                  b'{"k": NaN, "text": "a"}', b'{"text": "a", "text": "b", "k": 2}'])
def test_pathological_json_is_a_4xx(fuzzed, body):
    check_answer(fuzzed.post("/v1/search", content=body, headers={"Content-Type": "application/json"}))
    assert fuzzed.get("/health").status_code == 200
