"""A rerank stage's scores from a remote ``/v1/rerank`` endpoint (vLLM's shape; for texts, Cohere's too).

The request is ``{"model", "query", "documents", "top_n"}`` as vLLM reads it today: texts as plain strings, each
image as a document of its own, ``{"content": [{"type": "image_url", "image_url": {"url": "data:..."}}]}`` (its
bytes as a base64 ``data:`` URL), an image query the same; ``top_n`` is the number of candidates, so every one is
scored. The reply's ``results`` (``index``, ``relevance_score``; vLLM's ``id``, ``model``, ``usage`` and
``document`` are not needed) are put back in the order of the candidates. Any server that speaks the shape serves:
vLLM running a Qwen3-VL reranker, another genret serve.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from genret.types import Item, Query

if TYPE_CHECKING:
    from genret.stages.rerank import RerankConfig


class RemoteRerankError(RuntimeError):
    """The endpoint could not be reached or answered with an error or a malformed reply."""


def data_url(path: str | os.PathLike) -> str:
    """An image file as a ``data:`` URL (its own bytes, base64)."""
    path = Path(path)
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def image_part(path: str | os.PathLike) -> dict:
    """One image in the OpenAI/vLLM content form."""
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def rerank_request(model: str, query: Query, items: Sequence[Item]) -> dict:
    """The ``/v1/rerank`` body for ``query`` against ``items`` (images for a text query, texts for an image one)."""
    if query.target == "image":
        q: object = query.text or " ".join(query.dialog)
        documents: list = [{"content": [image_part(it.image)]} for it in items]
    else:
        q = {"content": [image_part(query.image)]}
        documents = [it.text for it in items]
    return {"model": model, "query": q, "documents": documents, "top_n": len(items)}


def remote_scores(config: "RerankConfig", query: Query, items: Sequence[Item]) -> list[float]:
    """POST the candidates to ``config.url``; their relevance scores in the order of ``items``.

    Raises:
        RemoteRerankError: naming the URL, on a connection error, an HTTP error (with the server's message) or a
            reply that does not score every candidate once.
    """
    body = json.dumps(rerank_request(config.model, query, items)).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise RemoteRerankError(f"{config.url}: the environment variable {config.api_key_env} (api_key_env) is "
                                    "not set; export the endpoint's key there")
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(config.url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise RemoteRerankError(f"{config.url}: HTTP {err.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise RemoteRerankError(f"{config.url}: cannot reach the rerank endpoint ({err}); is it running?") from None
    except ValueError:
        raise RemoteRerankError(f"{config.url}: the reply is not JSON") from None
    scores: list[float | None] = [None] * len(items)
    try:
        for result in reply["results"]:
            scores[int(result["index"])] = float(result["relevance_score"])
    except (KeyError, TypeError, ValueError, IndexError):
        raise RemoteRerankError(f"{config.url}: the reply is not in the /v1/rerank shape "
                                "({'results': [{'index', 'relevance_score'}]})") from None
    if any(s is None for s in scores):
        raise RemoteRerankError(f"{config.url}: the reply scores {sum(s is not None for s in scores)} of "
                                f"{len(items)} candidates; the endpoint must honour top_n")
    return scores  # type: ignore[return-value]
