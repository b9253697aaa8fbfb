"""How ``/v1/rerank`` and ``/score`` read queries and documents: vLLM's current shape and genret's older one, and
the requests that could be read both ways, refused (400) with the way to write each reading.

The shapes, as vLLM reads them today (``vllm/entrypoints/pooling/scoring/{protocol,typing,utils}.py`` and
``tests/entrypoints/pooling/scoring/test_cross_encoder_online_vision.py``, read at the commits named in
``docs/notes/issue-26-serve-vllm.md``):

- current: a string, one ``{"content": [parts]}`` object, or a list of both. Each object is ONE document whose parts
  (``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url": ...}}``) may mix text and images;
- older (genret until now, and vLLM while its content parts were images only): a list of strings and bare parts,
  each part one document, or ``{"content": [parts]}`` with each part one document.

So ``{"content": [p1, p2]}`` is one document today and two before: refused, as is an object with both ``content``
and a part's fields, and one with neither. A list may mix strings, objects and bare parts: each item is one document
either way. Images are checked and spooled through the request's own :class:`~genret.serve.inputs.RequestFiles`, as
every image a request carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from genret.serve.errors import RequestError
from genret.serve.inputs import RequestFiles

HOW = ('write each document as a string or as {"content": [parts]} in a list (vLLM\'s shape): '
       '[{"content": [p1]}, {"content": [p2]}] for two documents, [{"content": [p1, p2]}] for one document of two '
       "parts")


@dataclass(frozen=True)
class Input:
    """One query or document of a request.

    Attributes:
        at: where it is in the request (``documents[2]``), for messages.
        parts: its parts as ``(kind, value)``: ``("text", text)`` or ``("image", spooled path)``.
        echo: what a rerank answer gives back as its ``document`` (vLLM's ``{"text", "multi_modal"}``).
    """

    at: str
    parts: tuple[tuple[str, str], ...]
    echo: dict

    def single(self, what: str) -> tuple[str, str]:
        """Its one part, or 400 naming how many it has (``what`` says what the route scores)."""
        if len(self.parts) != 1:
            kinds = ", ".join(kind for kind, _ in self.parts) or "none"
            raise RequestError(400, f"{self.at}: {len(self.parts)} parts ({kinds}); {what}: send one part")
        return self.parts[0]


def _part(part: Any, at: str, files: RequestFiles) -> tuple[str, str]:
    """One content part as ``(kind, value)``; 400 for a part missing its type's field, or carrying a field its type
    does not use (``{"type": "image_url", "image_url": ..., "text": ...}`` could mean the text or the image)."""
    other = [f for f in ("text", "image_url") if f != part.type and getattr(part, f, None) is not None]
    if other:
        raise RequestError(400, f"{at}: a{'n' if part.type == 'image_url' else ''} {part.type} part does not use "
                                f"{', '.join(repr(f) for f in other)}; send each as its own part "
                                '({"type": "text", "text": ...} or {"type": "image_url", "image_url": {"url": ...}})')
    if part.type == "text" and part.text is not None:
        return "text", part.text
    if part.type == "image_url" and part.image_url is not None:
        return "image", files.put_value(part.image_url.url, at)
    raise RequestError(400, f"{at}: a {part.type} part needs its '{part.type}' field")


def _dump(part: Any) -> dict:
    return part.model_dump(exclude_none=True)


def _object(obj: Any, at: str, files: RequestFiles, lone: bool) -> Input:
    """One object: a ``{"content": [...]}`` document or a bare part (``lone``: not in a list, where a content of
    several parts could be several documents)."""
    fields = [f for f in ("type", "text", "image_url") if getattr(obj, f, None) is not None]
    content = getattr(obj, "content", None)
    if content is not None and fields:
        raise RequestError(400, f"{at}: has both 'content' (a document of parts, vLLM's shape) and "
                                f"{', '.join(repr(f) for f in fields)} (a bare part, genret's older shape), so it "
                                f"could be read two ways; send one of them. {HOW}")
    if content is not None:
        if not content:
            raise RequestError(400, f"{at}: 'content' is empty; give the document's parts")
        if lone and len(content) > 1:
            raise RequestError(400, f"{at}: {{\"content\": [...]}} with {len(content)} parts could be read two ways: "
                                    f"one document of {len(content)} parts (vLLM today) or {len(content)} documents "
                                    f"(genret's and vLLM's older shape); {HOW}")
        parts = tuple(_part(p, f"{at}.content[{j}]" if len(content) > 1 else at, files) for j, p in enumerate(content))
        return Input(at, parts, {"text": None, "multi_modal": [_dump(p) for p in content]})
    if "type" not in fields:
        given = ", ".join(repr(f) for f in fields) or "no known field"
        raise RequestError(400, f"{at}: an object with {given} is neither a document {{\"content\": [parts]}} nor a "
                                f"content part {{\"type\": \"text\" | \"image_url\", ...}}; {HOW} (a text may be a "
                                "plain string)")
    if lone:
        raise RequestError(400, f"{at}: a bare part outside a list; {HOW}")
    kind, value = _part(obj, at, files)
    echo = {"text": value, "multi_modal": None} if kind == "text" else {"text": None, "multi_modal": [_dump(obj)]}
    return Input(at, ((kind, value),), echo)


def read_inputs(value: Any, where: str, files: RequestFiles) -> list[Input]:
    """The inputs of one field (``documents``, ``queries``, ``text_1``, ...): a string, an object or a list of both.

    Raises:
        RequestError: 400 for an object that could be read two ways or is neither shape, or a part without its field.
    """
    if isinstance(value, str):
        return [Input(where, (("text", value),), {"text": value, "multi_modal": None})]
    if not isinstance(value, list):
        return [_object(value, where, files, lone=True)]
    out = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        out.append(Input(at, (("text", item),), {"text": item, "multi_modal": None}) if isinstance(item, str)
                   else _object(item, at, files, lone=False))
    return out


def read_query(value: Any, files: RequestFiles) -> Input:
    """The one query of a rerank request: a string or ``{"content": [parts]}`` (always one query, whatever its
    parts)."""
    if isinstance(value, str):
        return Input("query", (("text", value),), {"text": value, "multi_modal": None})
    content = value.content
    parts = tuple(_part(p, f"query[{j}]" if len(content) > 1 else "query", files) for j, p in enumerate(content))
    return Input("query", parts, {"text": None, "multi_modal": [_dump(p) for p in content]})


# /score's pairs of fields, current names first (vLLM's ScoreRequest union, in its order).
SCORE_FIELDS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))


def score_fields(body: Any) -> tuple[str, str]:
    """Which pair of fields a /score request uses; 400 when it gives none, half of one, or fields of two pairs."""
    given = [f for f in dict.fromkeys(f for pair in SCORE_FIELDS for f in pair) if getattr(body, f) is not None]
    pairs = [pair for pair in SCORE_FIELDS if set(pair) <= set(given) and set(given) <= set(pair)]
    if pairs:
        return pairs[0]
    names = "queries + documents (vLLM's current names), queries + items, data_1 + data_2 or text_1 + text_2"
    if not given:
        raise RequestError(400, f"give what to score: {names}")
    if any(set(given) <= set(pair) for pair in SCORE_FIELDS):
        pair = next(p for p in SCORE_FIELDS if set(given) <= set(p))
        missing = next(f for f in pair if f not in given)
        raise RequestError(400, f"{given[0]} without {missing}: send both ({names})")
    raise RequestError(400, f"{' and '.join(given)} together could be read two ways (as different pairs of fields); "
                            f"send one pair: {names}")
