"""The API key of ``genret serve``: one gate in front of the whole app, so every path needs the key unless it is one
of :data:`PUBLIC` (a route added later, a mount, an unknown path: all covered without a line of their own).

The gate is an ASGI layer rather than a FastAPI dependency on purpose: it answers before the body is read or
parsed, so a caller without the key never gets a request validated, a file parsed or a model queued, and learns
nothing about the body it sent.
"""

from __future__ import annotations

import hmac

from genret.serve.middleware import Receive, Scope, Send, send_error

PUBLIC = frozenset({"/health", "/", "/page.js", "/page.css"})
"""Paths answered without the key: the liveness check, and the page and its code, which carry no data (the page
asks for the key and sends it with each of its requests)."""


def key_matches(header: bytes, key: bytes) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <key>`` (the scheme in any case), compared in constant
    time.

    Example:
        >>> key_matches(b"Bearer s3cret", b"s3cret"), key_matches(b"Bearer s3cre", b"s3cret")
        (True, False)
    """
    scheme, _, given = header.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), key)


class RequireKey:
    """Refuses (401, the one error shape) every request but those to :data:`PUBLIC` paths that does not carry
    ``Authorization: Bearer KEY``; with no key, everything passes."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.key or scope["type"] not in ("http", "websocket") or scope["path"] in PUBLIC:
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), b"")
        if key_matches(header, self.key):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        await send_error(send, 401, "this server needs its API key: send 'Authorization: Bearer KEY'",
                         {"WWW-Authenticate": "Bearer"})
