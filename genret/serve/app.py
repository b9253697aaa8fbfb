"""``genret serve``: a saved pipeline behind an HTTP API (FastAPI) and a results page.

Endpoints: ``POST /v1/search`` (text, image or both; the record of ``genret search --json``), ``POST
/v1/search/upload`` (the same with a multipart image), ``POST /v1/rerank`` (also ``/rerank``, ``/v2/rerank``) and
``POST /score`` (also ``/v1/score``) in vLLM's shapes, current and older (:mod:`genret.serve.documents`),
``POST /v1/embeddings`` (the OpenAI shape, texts and images, embedded as queries unless ``role`` says
``document``), ``GET /v1/indices``, ``GET /v1/images/{id}`` (a gallery image by id, never by path), ``GET /metrics``
(Prometheus text), ``GET /openapi.json``, ``GET /health`` and ``GET /`` (the page, with ``/page.js`` and
``/page.css``).

What holds for every request: with an API key, every path but :data:`~genret.serve.auth.PUBLIC` needs it (one
gate in front of the app, before the body is read); the body is counted as it arrives (:class:`~genret.serve.middleware.BodyLimit`); every
string is bounded and valid Unicode (:mod:`genret.serve.schemas`) and every text fits the context of the models
that read it (:mod:`genret.serve.limits`); each request's images live in its own folder, removed when it ends;
every error is ``{"error": {"status", "message"}}`` with no server path in it; every response carries a strict
Content-Security-Policy. Every model call goes through one :class:`~genret.serve.batcher.DynamicBatcher`:
concurrent requests of one kind share a call, and only its worker thread touches the pipeline.
"""

import asyncio
import dataclasses
import logging
import mimetypes
import time
import uuid
from pathlib import Path
from typing import Any, Literal, Optional
from urllib.parse import quote

import numpy as np

from genret._io import ManifestError
from genret.data.images import ImageLoadError, probe_image
from genret.index.items import item_image
from genret.pipeline import RetrievalPipeline
from genret.serve.auth import RequireKey
from genret.serve.batcher import DynamicBatcher, QueueFull
from genret.serve.documents import Input, read_inputs, read_query, score_fields
from genret.serve.errors import Redactor, RequestError, error_body
from genret.serve.inputs import RequestFiles, Spool
from genret.serve.limits import TokenLimit, encoder_limit, rerank_limit
from genret.serve.schemas import request_models
from genret.serve.settings import ServeConfig
from genret.stages.rerank import RerankStage
from genret.types import Item, Query

logger = logging.getLogger(__name__)
ASSETS = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8"),
          "/page.css": ("page.css", "text/css; charset=utf-8")}
# Which gallery each kind of query searches (Query.modality → targets): no other pairing runs through the stages.
TARGETS = {"text": ("image",), "image": ("text",), "image+text": ("image",)}
# The roles an embedding request may ask for (genret.encoders.base.DualEncoder.encode_texts).
ROLES = ("query", "document")


def public_name(ref: str) -> str:
    """What an answer calls a model: a hub id as it is, a local folder by its name (never the server's path)."""
    path = Path(ref)
    return path.name if (path.is_absolute() or path.exists()) else ref


def _server_folders(pipe: RetrievalPipeline, spool: Spool) -> list[str]:
    """Folders whose paths must not appear in an answer: the spool, the pipeline's, its models', its images'."""
    folders = [str(spool.folder)]
    source = getattr(pipe.config, "_source", None)
    if source:
        folders.append(str(Path(source).resolve().parent))
    refs = [pipe.config.encoder.model] + [v for s in pipe.stages if dataclasses.is_dataclass(s.config)
                                          for v in dataclasses.asdict(s.config).values() if isinstance(v, str)]
    for ref in refs:
        if ref and Path(ref).is_absolute():
            folders += [ref, str(Path(ref).parent)]
    first = next(iter(pipe.gallery.items.get("image", {}).values()), None)
    if first is not None and first.image:
        folders.append(str(Path(first.image).resolve().parent))
    return folders


def create_app(pipe: RetrievalPipeline, config: ServeConfig | None = None):
    """The FastAPI application serving ``pipe`` (loaded and indexed)."""
    from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    from genret.serve.metrics import Metrics
    from genret.serve.middleware import BodyLimit, Frame

    config = config or ServeConfig()
    spool = Spool(max_pixels=config.max_image_pixels)
    redactor = Redactor(_server_folders(pipe, spool))
    metrics = Metrics()
    models = request_models(config)
    rerankers = {s.name: s for s in pipe.stages if isinstance(s, RerankStage)}
    encoder_name = public_name(pipe.config.encoder.model)
    encoder_tokens = encoder_limit(pipe.encoder, encoder_name)
    sample = _sample_image(pipe)
    stage_tokens = {name: rerank_limit(stage, sample) for name, stage in rerankers.items()}

    def run_search(payloads):
        results = pipe.answer_many([q for q, _ in payloads], [k for _, k in payloads])
        return [(r, len(payloads)) for r in results]

    def run_rerank(payloads):
        """Each payload is one request's (stage name, [(query, items), ...]): the scores of each group."""
        return [[rerankers[name].score(query, items, cache=False) for query, items in groups]
                for name, groups in payloads]

    def run_embed(kind: str, role: str):
        """Each payload is one request's inputs of ``kind`` (texts or image paths), all to be embedded as ``role``:
        all requests' inputs are encoded together, then split back."""
        def run(payloads):
            encode = pipe.encoder.encode_texts if kind == "text" else pipe.encoder.encode_images
            vectors = encode([x for inputs in payloads for x in inputs], role=role)
            bounds = np.cumsum([0] + [len(inputs) for inputs in payloads])
            return [vectors[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return run

    # One kind per (input kind, role): an instructed embedder embeds a query and a document differently, so only
    # requests of one role share a call.
    handlers = {"search": run_search, "rerank": run_rerank,
                **{f"embed_{kind}_{role}": run_embed(kind, role) for kind in ("text", "image") for role in ROLES}}
    batcher = DynamicBatcher(handlers, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000,
                             max_queue=config.max_queue, on_batch=metrics.batch)

    # No /docs or /redoc (their pages load from a CDN); the schema is a route of its own, behind the key.
    app = FastAPI(title="genret", version=_version(), docs_url=None, redoc_url=None, openapi_url=None,
                  description="Image-text retrieval with multimodal LLMs: "
                              f"pipeline {pipe.config.name!r}, stages {', '.join(s.name for s in pipe.stages)}")
    app.state.batcher, app.state.spool, app.state.metrics = batcher, spool, metrics
    # Outermost last: Frame (headers, errors, metrics) → RequireKey (before any body is read) → BodyLimit → the app.
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(RequireKey, key=config.api_key)
    app.add_middleware(Frame, on_request=metrics.request)

    @app.on_event("shutdown")
    def _close() -> None:
        batcher.close()
        spool.close()

    def error(status: int, message: str, headers=None) -> Response:
        return Response(error_body(status, redactor.scrub(message)), status_code=status, headers=headers,
                        media_type="application/json")

    @app.exception_handler(RequestError)
    async def _bad(request: Request, err: RequestError):
        return error(err.status, err.message, err.headers)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        if err.status_code == 404 and "route" not in request.scope:
            message = f"no route {request.method} {request.url.path}; the API is under /v1 (GET /openapi.json)"
        elif err.status_code == 405:
            allowed = (err.headers or {}).get("allow", (err.headers or {}).get("Allow", ""))
            message = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
        else:
            message = str(err.detail)
        return error(err.status_code, message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        parts = []
        for e in err.errors():
            where = ".".join(str(p) for p in e["loc"] if p != "body") or "body"
            hint = " (--max-text-chars)" if e.get("type") == "string_too_long" and \
                (e.get("ctx") or {}).get("max_length") == config.max_text_chars else ""
            msg = "not valid Unicode (a lone surrogate)" if e.get("type") == "string_unicode" else e["msg"]
            parts.append(f"{where}: {msg}{hint}")
        return error(422, "; ".join(parts[:10]) + (f"; and {len(parts) - 10} more" if len(parts) > 10 else ""))

    async def request_files():
        files = spool.open()
        try:
            yield files
        finally:
            files.close()

    def missing_gallery_image(err: ImageLoadError) -> str | None:
        """The id of the gallery image an error names, if any (an image removed after indexing)."""
        text = str(err)
        for item in pipe.gallery.items.get("image", {}).values():
            if item.image and str(item.image) in text:
                return item.id
        return None

    async def call(kind: str, payload: Any):
        try:
            return await batcher.run(kind, payload, timeout=config.timeout_s)
        except QueueFull as err:
            raise RequestError(503, f"the server is busy ({err})") from None
        except (TimeoutError, asyncio.TimeoutError):
            raise RequestError(504, f"the request took longer than {config.timeout_s:g} s (--timeout-s)") from None
        except ImageLoadError as err:
            item = missing_gallery_image(err)
            if item is None:
                raise RequestError(400, str(err)) from None
            logger.error("gallery image %r is unreadable: %s", item, err)
            raise RequestError(500, f"gallery image {item!r} is missing or unreadable on the server (removed or "
                                    "changed after indexing); the server's log names the file") from None
        except ValueError as err:  # what the pipeline refuses (k, a prompt past the context) is the caller's to fix
            raise RequestError(400, str(err)) from None

    def check_tokens(texts: list[tuple[str, str]], limits: list[Optional[TokenLimit]]) -> None:
        for limit in limits:
            if limit is not None:
                limit.check(texts)

    def query_of(text: str | None, image_path: str | None, target: str | None,
                 instruction: str | None = None) -> Query:
        if text is not None and not text.strip():
            text = None
        if text is None and image_path is None:
            raise RequestError(400, "give a query: text, image, or both (an image and its modification)")
        modality = "image+text" if (text is not None and image_path is not None) else "text" if text else "image"
        target = target or TARGETS[modality][0]
        if target not in TARGETS[modality]:
            kind = {"text": "a text", "image": "an image", "image+text": "an image and text"}[modality]
            raise RequestError(400, f"target {target!r} does not fit {kind} query: a text "
                                    "query searches images, an image query texts, and an image with a modification "
                                    f"text images; leave target out or send {TARGETS[modality][0]!r}")
        if target not in pipe.gallery.indexes:
            raise RequestError(400, f"this pipeline has no {target} gallery (it has: "
                                    f"{', '.join(pipe.gallery.indexes) or 'none'})")
        if text is not None:  # the encoder cuts a text to its context (as genret search does); an MLLM would not
            check_tokens([("text", text)], list(stage_tokens.values()))
        return Query(id="query", text=text, image=image_path, target=target, instruction=instruction if instruction and instruction.strip() else None)

    def check_k(k: int, target: str) -> None:
        size = len(pipe.gallery.index(target))
        top = min(config.max_k, size)
        if not 1 <= k <= top:
            raise RequestError(400, f"k must be between 1 and {top} (the {target} gallery holds {size}; the "
                                    f"server allows at most {config.max_k}), got {k}")

    def record(result, batch: int) -> dict:
        out = result.to_dict()
        out["query"]["image"] = "(uploaded)" if result.query.image is not None else None
        for hit, row in zip(result.hits, out["results"]):
            if result.query.target == "image":
                row["image"] = "/v1/images/" + quote(hit.id, safe="")
        out["batch_size"] = batch
        return out

    async def search(text, image_path, k, target, instruction=None):
        query = query_of(text, image_path, target, instruction)
        check_k(k, query.target)
        result, batch = await call("search", (query, k))
        return record(result, batch)

    @app.post("/v1/search")
    async def search_json(body: models.Search, files: RequestFiles = Depends(request_files)) -> dict:
        """Search with a text, an image (base64), or both (composed, through the pipeline's rewrite stage)."""
        path = files.put_value(body.image, "image") if body.image is not None else None
        return await search(body.text, path, body.k, body.target, body.instruction)

    @app.post("/v1/search/upload")
    async def search_upload(file: UploadFile = File(..., description="the query image"),
                            text: Optional[models.Text] = Form(None), k: int = Form(10),
                            target: Optional[Literal["image", "text"]] = Form(None),
                            files: RequestFiles = Depends(request_files)) -> dict:
        """Search with an uploaded image (multipart), optionally with a modification text."""
        data = await file.read(config.max_body_bytes + 1)
        path = files.put(data, f"file {file.filename!r}")
        return await search(text, path, k, target)

    def parts(value, where: str, files: RequestFiles) -> list[tuple[str, str, str]]:
        """(field, kind, text or spooled path) for a string, a content part, or {"content": [...]}."""
        items = value.content if isinstance(value, models.Content) else value if isinstance(value, list) else [value]
        out = []
        for i, part in enumerate(items):
            at = f"{where}[{i}]" if len(items) > 1 or isinstance(value, (list, models.Content)) else where
            if isinstance(part, str):
                out.append((at, "text", part))
            elif part.type == "text" and part.text is not None:
                out.append((at, "text", part.text))
            elif part.type == "image_url" and part.image_url is not None:
                out.append((at, "image", files.put_value(part.image_url.url, at)))
            else:
                raise RequestError(400, f"{at}: a {part.type} part needs its '{part.type}' field")
        return out

    def rerank_stage(model: str | None) -> str:
        """The rerank stage a request names (by stage name or model), or the first."""
        if not rerankers:
            raise RequestError(404, "this pipeline has no rerank stage")
        name = model or next(iter(rerankers))
        if name not in rerankers:
            by_model = [n for n, s in rerankers.items() if s.config.model == name]
            if not by_model:
                raise RequestError(404, f"model {name!r} is not served here; use one of: {', '.join(rerankers)}")
            name = by_model[0]
        return name

    async def score_pairs(name: str, pairs: list[tuple[Input, Input]],
                          instruction: str | None = None) -> tuple[list[float], Optional[int]]:
        """Each (query, document) pair's score from stage ``name`` and the prompt tokens they take (None where the
        stage's prompt is not measured: a remote stage). A query ranks documents of the other kind; pairs sharing a
        query are scored in one call."""
        if not pairs or len(pairs) > config.max_documents:
            raise RequestError(400, f"documents: between 1 and {config.max_documents}, got {len(pairs)}")
        queries, groups, texts, directions = {}, {}, [], []
        for i, (query, doc) in enumerate(pairs):
            qkind, qvalue = query.single("one text or one image per query")
            want = "image" if qkind == "text" else "text"
            kind, value = doc.single(f"stage {name!r} scores one {want} per document for a {qkind} query")
            if kind != want:
                raise RequestError(400, f"{doc.at}: a {qkind} query ranks {want} documents (text → image or "
                                        f"image → text), not {kind}s")
            queries.setdefault((qkind, qvalue), query.at)
            groups.setdefault((qkind, qvalue), []).append((i, Item(str(i), want, text=value if want == "text" else None,
                                                                   image=value if want == "image" else None)))
            texts.append((query.at, qvalue) if qkind == "text" else (doc.at, value))
            directions.append("t2i" if qkind == "text" else "i2t")
        limit, unique = stage_tokens[name], list(dict.fromkeys(texts))
        counts = dict(zip(unique, limit.check(unique))) if limit is not None else {}
        instruction = instruction if instruction and instruction.strip() else None  # Qwen3-VL-Reranker's <Instruct>
        jobs = [(Query(id=queries[key], text=key[1], instruction=instruction) if key[0] == "text"
                 else Query(id=queries[key], image=key[1], instruction=instruction),
                 [item for _, item in rows]) for key, rows in groups.items()]
        found = await call("rerank", (name, jobs))
        scores = [0.0] * len(pairs)
        for rows, got in zip(groups.values(), found):
            for (i, _), score in zip(rows, got):
                scores[i] = float(score)
        tokens = None
        if limit is not None and limit.prompt:
            # Per pair, as vLLM counts its prompt tokens: the stage's prompt (measured once, on the gallery's first
            # image) and the pair's text (less the special tokens the tokenizer adds alone, which the prompt holds).
            bare = len(limit.tokenizer("", verbose=False)["input_ids"])
            tokens = sum(limit.prompt[d] + counts[t] - bare for d, t in zip(directions, texts))
        return scores, tokens

    async def rerank(body: models.Rerank, files: RequestFiles = Depends(request_files)) -> dict:
        """Score documents against a query with a rerank stage (vLLM / Cohere / Jina shape); results by score."""
        name = rerank_stage(body.model)
        query = read_query(body.query, files)
        docs = read_inputs(body.documents, "documents", files)
        scores, tokens = await score_pairs(name, [(query, doc) for doc in docs], body.instruction)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n or len(scores)]
        results = []
        for i in order:
            row = {"index": i, "relevance_score": scores[i]}
            if body.return_documents:
                row["document"] = docs[i].echo
            results.append(row)
        return {"id": f"rerank-{uuid.uuid4().hex}", "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "results": results}

    for route in ("/v1/rerank", "/rerank", "/v2/rerank"):  # vLLM serves all three
        app.post(route, include_in_schema=route == "/v1/rerank")(rerank)

    async def score(body: models.Score, files: RequestFiles = Depends(request_files)) -> dict:
        """vLLM's /score: queries and documents in pairs (1:1, 1:N or N:N, the i-th query with the i-th document),
        each pair's score in their order."""
        name = rerank_stage(body.model)
        left_field, right_field = score_fields(body)
        left = read_inputs(getattr(body, left_field), left_field, files)
        right = read_inputs(getattr(body, right_field), right_field, files)
        if len(left) > 1 and len(left) != len(right):
            raise RequestError(400, f"{left_field} and {right_field}: {len(left)} and {len(right)}; vLLM pairs them "
                                    f"1:1, 1:N or N:N (the i-th {left_field} item with the i-th {right_field} item)")
        scores, tokens = await score_pairs(name, list(zip(left * len(right) if len(left) == 1 else left, right)),
                                           body.instruction)
        return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()), "model": name,
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                          "prompt_tokens_details": None}}

    for route in ("/score", "/v1/score"):
        app.post(route, include_in_schema=route == "/score")(score)

    @app.post("/v1/embeddings")
    async def embeddings(body: models.Embedding, files: RequestFiles = Depends(request_files)) -> dict:
        """Embed texts and images with the pipeline's encoder (OpenAI shape; images as image_url parts), as
        ``role``: ``query`` (the default: what a client compares against the gallery, embedded as the prefilter
        embeds a search) or ``document`` (as the gallery was indexed). A CLIP-like encoder embeds both alike; an
        instructed MLLM embedder uses that role's instruction."""
        role = "query" if body.role is None else body.role
        if role not in ROLES:
            raise RequestError(400, f"role must be 'query' or 'document' (or left out: 'query'), got {role!r}")
        inputs = parts(body.input if isinstance(body.input, list) else [body.input], "input", files)
        if not inputs or len(inputs) > config.max_documents:
            raise RequestError(400, f"input: between 1 and {config.max_documents} items, got {len(inputs)}")
        check_tokens([(at, v) for at, kind, v in inputs if kind == "text"], [encoder_tokens])
        # One job per kind for the whole request (the queue counts requests, not inputs); concurrent requests' jobs
        # share model calls.
        kinds = {kind: [i for i, (_, k, _) in enumerate(inputs) if k == kind] for kind in ("text", "image")}
        kinds = {kind: rows for kind, rows in kinds.items() if rows}
        found = await asyncio.gather(*(call(f"embed_{kind}_{role}", [inputs[i][2] for i in rows])
                                       for kind, rows in kinds.items()))
        vectors = {i: v for rows, vs in zip(kinds.values(), found) for i, v in zip(rows, vs)}
        data = [{"object": "embedding", "index": i, "embedding": [float(x) for x in vectors[i]]}
                for i in range(len(inputs))]
        return {"object": "list", "data": data, "model": encoder_name, "usage": {"inputs": len(inputs)}}

    @app.get("/v1/indices")
    async def indices() -> dict:
        """The galleries the pipeline searches."""
        encoder = {**pipe.encoder.describe(), "model": encoder_name}
        out = [{"name": modality, "count": len(index), "factory": index.factory, "metric": index.metric,
                "encoder": encoder} for modality, index in pipe.gallery.indexes.items()]
        return {"pipeline": pipe.config.name, "stages": [s.name for s in pipe.stages], "indices": out}

    @app.get("/v1/images/{item_id:path}")
    async def image(item_id: str):
        """A gallery image, by its id (never by a path from the request)."""
        items = pipe.gallery.items.get("image", {})
        if item_id not in items:
            raise RequestError(404, f"no gallery image with id {item_id!r}")
        try:  # the file that was indexed, inside the gallery's images, checked by its content hash, and an image
            path = Path(item_image(items[item_id]))
            reason = probe_image(path)
            if reason is not None:
                raise ImageLoadError(reason)
            data = path.read_bytes()
        except (ImageLoadError, ManifestError, OSError) as err:
            logger.error("gallery image %r: %s", item_id, err)
            raise RequestError(404, f"gallery image {item_id!r} is no longer on the server as it was indexed (its "
                                    "file was removed, moved or changed after indexing)") from None
        return Response(data, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @app.get("/metrics")
    async def prometheus() -> Response:
        metrics.waiting.set(batcher.waiting)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict:
        return app.openapi()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "pipeline": pipe.config.name,
                "galleries": {m: len(i) for m, i in pipe.gallery.indexes.items()}, "waiting": batcher.waiting}

    def asset(name: str, media_type: str):
        async def serve() -> Response:
            return Response((Path(__file__).parent / name).read_bytes(), media_type=media_type)
        return serve

    for route, (name, media_type) in ASSETS.items():
        app.get(route, include_in_schema=False)(asset(name, media_type))
    return app


def _sample_image(pipe: RetrievalPipeline):
    """A gallery image (what a rerank prompt's image tokens are measured on), else a blank one."""
    from PIL import Image

    from genret.data.images import load_image

    first = next(iter(pipe.gallery.items.get("image", {}).values()), None)
    try:
        return load_image(first.image) if first is not None and first.image else Image.new("RGB", (336, 336))
    except ImageLoadError:
        return Image.new("RGB", (336, 336))


def _version() -> str:
    from genret import __version__

    return __version__
