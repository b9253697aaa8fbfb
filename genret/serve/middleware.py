"""The ASGI layers around every request of ``genret serve`` (plain ASGI, so they see each message as it passes):

- :class:`Frame`, outermost: the security headers on every response, the one error shape for anything unhandled
  (a 500 that names no file), and the metrics of each request by its route;
- :class:`BodyLimit`: the body counted as it arrives, ``Content-Length`` or chunked alike; past the limit the request
  is answered 413 and nothing downstream sees more of it.
"""

from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

from genret.serve.errors import error_body

logger = logging.getLogger(__name__)

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


async def send_error(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer with the one error shape."""
    body = error_body(status, message)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Frame:
    """Security headers on every response, a 500 in the one shape for an unhandled error, and metrics.

    Args:
        on_request: called with (route template or ``"(unmatched)"``, status, seconds) after each request.
    """

    def __init__(self, app, on_request: Callable[[str, int, float], None] | None = None) -> None:
        self.app, self.on_request = app, on_request
        self._headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def framed(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in self._headers if k not in names)]}
            await send(message)

        try:
            await self.app(scope, receive, framed)
        except Exception:  # after the app's own handlers: what none of them answered
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not status[0]:
                status[0] = 500
                await send_error(framed, 500, "internal error; the server's log has the details")
        finally:
            if self.on_request is not None:
                route = getattr(scope.get("route"), "path", None) or "(unmatched)"
                self.on_request(route, status[0] or 500, time.perf_counter() - start)


class BodyTooLarge(Exception):
    """Raised into the app's ``receive`` once a body passes the limit (the app stops reading)."""


class BodyLimit:
    """Refuses a request body above ``limit`` bytes, counting each ``http.request`` message as it arrives.

    A ``Content-Length`` above the limit is answered at once, unread; any other body (chunked, or one whose
    ``Content-Length`` understates it) is counted, and the read that passes the limit ends the request with 413
    instead of whatever the app was going to answer.
    """

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    def _message(self, size: str) -> str:
        return (f"the request body is {size}, above the server's limit of {self.limit:,} bytes (--max-body-bytes); "
                "send smaller images")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.strip().isdigit() and int(value) > self.limit:
                return await send_error(send, 413, self._message(f"{int(value):,} bytes"))
        seen, over, started = [0], [False], [False]

        async def counted() -> dict:
            if over[0]:
                raise BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    over[0] = True
                    raise BodyTooLarge()
            return message

        async def guarded(message: dict) -> None:
            if over[0]:  # the app answers its failed read somehow: that answer is replaced by the 413
                return
            if message["type"] == "http.response.start":
                started[0] = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except BodyTooLarge:
            pass
        except Exception:
            if not over[0]:
                raise
        if over[0] and not started[0]:
            await send_error(send, 413, self._message(f"more than {self.limit:,} bytes"))
