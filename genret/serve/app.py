"""``genret serve``: a saved pipeline behind an HTTP API (FastAPI) and a results page.

Endpoints: ``POST /v1/search`` (text, image or both; the record of ``genret search --json``), ``POST
/v1/search/upload`` (the same with a multipart image), ``POST /v1/rerank`` (the Cohere / Jina / vLLM shape),
``POST /v1/embeddings`` (the OpenAI shape, texts and images), ``GET /v1/indices``, ``GET /v1/images/{id}`` (a
gallery image by id, never by path), ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /`` (the page).
Every model call goes through one :class:`~genret.serve.batcher.DynamicBatcher`: concurrent requests of one kind
share a call, and only its worker thread touches the pipeline.
"""

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, Field

from genret.pipeline import RetrievalPipeline
from genret.serve.batcher import DynamicBatcher, QueueFull
from genret.serve.inputs import RequestError, Spool
from genret.serve.settings import ServeConfig
from genret.stages.rerank import RerankStage
from genret.types import Item, Query

logger = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("page.html")


class SearchRequest(BaseModel):
    """A search: a text, an image, or both (a composed query)."""

    text: str | None = Field(None, description="the query text; with an image, the modification (composed)")
    image: str | None = Field(None, description="the query image, base64 or a data:image/...;base64, URL")
    k: int = Field(10, description="results to return")
    target: Literal["image", "text"] | None = Field(None, description="the gallery to search (default: images "
                                                                           "for text and composed queries, texts for an image)")


class ImageURL(BaseModel):
    url: str


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Content(BaseModel):
    content: list[ContentPart]


class RerankRequest(BaseModel):
    model: str | None = Field(None, description="a rerank stage's name or model (default: the first)")
    query: Union[str, Content]
    documents: Union[list[Union[str, ContentPart]], Content]
    top_n: int | None = None
    return_documents: bool = False


class EmbeddingRequest(BaseModel):
    input: Union[str, list[Union[str, ContentPart]]]
    model: str | None = None
    encoding_format: Literal["float"] = "float"


def create_app(pipe: RetrievalPipeline, config: ServeConfig | None = None):
    """The FastAPI application serving ``pipe`` (loaded and indexed)."""
    from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    from genret.serve.metrics import Metrics

    config = config or ServeConfig()
    spool = Spool(max_pixels=config.max_image_pixels)
    metrics = Metrics()
    rerankers = {s.name: s for s in pipe.stages if isinstance(s, RerankStage)}

    def run_search(payloads):
        results = pipe.answer_many([q for q, _ in payloads], [k for _, k in payloads])
        return [(r, len(payloads)) for r in results]

    def run_rerank(payloads):
        return [rerankers[name].score(query, items, cache=False) for name, query, items in payloads]

    handlers = {"search": run_search, "rerank": run_rerank,
                "embed_text": lambda texts: list(pipe.encoder.encode_texts(list(texts))),
                "embed_image": lambda paths: list(pipe.encoder.encode_images(list(paths)))}
    batcher = DynamicBatcher(handlers, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000,
                             max_queue=config.max_queue, on_batch=metrics.batch)

    app = FastAPI(title="genret", version=_version(), description="Image-text retrieval with multimodal LLMs: "
                  f"pipeline {pipe.config.name!r}, stages {', '.join(s.name for s in pipe.stages)}")
    app.state.batcher, app.state.spool, app.state.metrics = batcher, spool, metrics

    @app.on_event("shutdown")
    def _close() -> None:
        batcher.close()
        spool.close()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)

    @app.exception_handler(RequestError)
    async def _bad(request: Request, err: RequestError):
        return error(err.status, err.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in err.errors()]
        return error(422, "; ".join(parts))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return error(500, f"internal error ({err.__class__.__name__}); the server log has the details")

    @app.middleware("http")
    async def _measure(request: Request, call_next):
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            response = error(413, f"the request body is {int(length):,} bytes, above the server's limit of "
                                  f"{config.max_body_bytes:,} (--max-body-bytes); send smaller images")
        else:
            response = await call_next(request)
        metrics.request(request.url.path, response.status_code, time.perf_counter() - start)
        return response

    def authorised(request: Request) -> None:
        if not config.api_key:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {config.api_key}":
            raise RequestError(401, "this server needs an API key: send 'Authorization: Bearer KEY'")

    async def call(kind: str, payload: Any):
        try:
            return await batcher.run(kind, payload, timeout=config.timeout_s)
        except QueueFull as err:
            raise RequestError(503, f"the server is busy ({err})") from None
        except (TimeoutError, asyncio.TimeoutError):
            raise RequestError(504, f"the request took longer than {config.timeout_s:g} s (--timeout-s)") from None
        except ValueError as err:  # what the pipeline refuses (k, an unreadable query) is the caller's to fix
            raise RequestError(400, str(err)) from None


    def query_of(text: str | None, image_path: str | None, target: str | None) -> Query:
        if text is not None and not text.strip():
            text = None
        if text is None and image_path is None:
            raise RequestError(400, "give a query: text, image, or both (an image and its modification)")
        if text is not None and len(text) > 4000:
            raise RequestError(400, f"text is {len(text)} characters; at most 4000")
        if target is None and image_path is not None and text is not None:
            target = "image"
        query = Query(id="query", text=text, image=image_path, target=target)
        if query.target not in pipe.gallery.indexes:
            raise RequestError(400, f"this pipeline has no {query.target} gallery (it has: "
                                    f"{', '.join(pipe.gallery.indexes) or 'none'})")
        return query

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
                row["image"] = f"/v1/images/{hit.id}"
        out["batch_size"] = batch
        return out

    async def search(text, image_path, k, target):
        query = query_of(text, image_path, target)
        check_k(k, query.target)
        result, batch = await call("search", (query, k))
        return record(result, batch)

    @app.post("/v1/search", dependencies=[Depends(authorised)])
    async def search_json(body: SearchRequest) -> dict:
        """Search with a text, an image (base64), or both (composed, through the pipeline's rewrite stage)."""
        path = spool.put_value(body.image, "image") if body.image is not None else None
        return await search(body.text, path, body.k, body.target)

    @app.post("/v1/search/upload", dependencies=[Depends(authorised)])
    async def search_upload(file: UploadFile = File(..., description="the query image"),
                            text: str | None = Form(None), k: int = Form(10),
                            target: Literal["image", "text"] | None = Form(None)) -> dict:
        """Search with an uploaded image (multipart), optionally with a modification text."""
        data = await file.read(config.max_body_bytes + 1)
        path = spool.put(data, f"file {file.filename!r}")
        return await search(text, path, k, target)





    def parts(value, where: str) -> list[tuple[str, str]]:
        """(kind, text or spooled path) for a string, a content part, or {"content": [...]}."""
        items = value.content if isinstance(value, Content) else value if isinstance(value, list) else [value]
        out = []
        for i, part in enumerate(items):
            at = f"{where}[{i}]" if len(items) > 1 or isinstance(value, (list, Content)) else where
            if isinstance(part, str):
                out.append(("text", part))
            elif part.type == "text" and part.text is not None:
                out.append(("text", part.text))
            elif part.type == "image_url" and part.image_url is not None:
                out.append(("image", spool.put_value(part.image_url.url, at)))
            else:
                raise RequestError(400, f"{at}: a {part.type} part needs its '{part.type}' field")
        return out

    @app.post("/v1/rerank", dependencies=[Depends(authorised)])
    async def rerank(body: RerankRequest) -> dict:
        """Score documents against a query with a rerank stage (Cohere / Jina / vLLM shape)."""
        if not rerankers:
            raise RequestError(404, "this pipeline has no rerank stage")
        name = body.model or next(iter(rerankers))
        if name not in rerankers:
            by_model = [n for n, s in rerankers.items() if s.config.model == name]
            if not by_model:
                raise RequestError(404, f"model {name!r} is not served here; use one of: {', '.join(rerankers)}")
            name = by_model[0]
        query = parts(body.query, "query")
        if len(query) != 1:
            raise RequestError(400, f"query: one text or one image, got {len(query)} parts")
        docs = parts(body.documents, "documents")
        if not docs or len(docs) > config.max_documents:
            raise RequestError(400, f"documents: between 1 and {config.max_documents}, got {len(docs)}")
        (qkind, qvalue), want = query[0], "image" if query[0][0] == "text" else "text"
        wrong = [i for i, (kind, _) in enumerate(docs) if kind != want]
        if wrong:
            raise RequestError(400, f"documents{wrong[:5]}: a {qkind} query ranks {want} documents "
                                    f"(text → image or image → text), not {qkind}s")
        q = Query(id="query", text=qvalue) if qkind == "text" else Query(id="query", image=qvalue)
        items = [Item(str(i), want, text=v if want == "text" else None, image=v if want == "image" else None)
                 for i, (_, v) in enumerate(docs)]
        scores = await call("rerank", (name, q, items))
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n or len(scores)]
        results = []
        for i in order:
            row = {"index": i, "relevance_score": scores[i]}
            if body.return_documents and want == "text":
                row["document"] = {"text": docs[i][1]}
            results.append(row)
        return {"model": name, "results": results, "usage": {"documents": len(docs)}}


    @app.post("/v1/embeddings", dependencies=[Depends(authorised)])
    async def embeddings(body: EmbeddingRequest) -> dict:
        """Embed texts and images with the pipeline's dual encoder (OpenAI shape; images as image_url parts)."""
        inputs = parts(body.input if isinstance(body.input, list) else [body.input], "input")
        if not inputs or len(inputs) > config.max_documents:
            raise RequestError(400, f"input: between 1 and {config.max_documents} items, got {len(inputs)}")
        # All of a request's inputs are queued at once, so they share model calls with each other and with others'.
        vectors = await asyncio.gather(*(call("embed_text" if kind == "text" else "embed_image", value)
                                         for kind, value in inputs))
        data = [{"object": "embedding", "index": i, "embedding": [float(x) for x in v]} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": pipe.config.encoder.model,
                "usage": {"inputs": len(inputs)}}

    @app.get("/v1/indices", dependencies=[Depends(authorised)])
    async def indices() -> dict:
        """The galleries the pipeline searches."""
        out = []
        for modality, index in pipe.gallery.indexes.items():
            out.append({"name": modality, "count": len(index), "factory": index.factory, "metric": index.metric,
                        "encoder": pipe.encoder.describe()})
        return {"pipeline": pipe.config.name, "stages": [s.name for s in pipe.stages], "indices": out}

    @app.get("/v1/images/{item_id}")
    async def image(item_id: str):
        """A gallery image, by its id (never by a path from the request)."""
        items = pipe.gallery.items.get("image", {})
        if item_id not in items:
            raise RequestError(404, f"no gallery image with id {item_id!r}")
        return FileResponse(items[item_id].image)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "pipeline": pipe.config.name,
                "galleries": {m: len(i) for m, i in pipe.gallery.indexes.items()}, "waiting": batcher.waiting}

    @app.get("/metrics", dependencies=[Depends(authorised)])
    async def prometheus() -> Response:
        metrics.waiting.set(batcher.waiting)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    return app


def _version() -> str:
    from genret import __version__

    return __version__
