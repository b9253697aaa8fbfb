"""The one error shape of ``genret serve``, ``{"error": {"status": N, "message": "..."}}``, and the scrubbing that
keeps the server's file paths out of every message."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

REDACTED = "<server path>"
# An absolute path: a slash, then one or more path components (no spaces or quotes).
_ABSOLUTE = re.compile(r"(?<![\w/.~:-])/(?:[\w.@+~-]+/?)+")


class RequestError(Exception):
    """A request the server answers with ``status`` and a message that says what to fix.

    Example:
        >>> RequestError(400, "give a query").status
        400
    """

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, dict(headers or {})


class Redactor:
    """Replaces server file paths in a message with ``<server path>``: first the folders the server knows (exactly,
    spaces and all), then any absolute path whose first folder exists on this machine (``/tmp/...``, ``/home/...``;
    never an API path such as ``/v1/images/3``, as no ``/v1`` folder exists).

    Example:
        >>> Redactor(["/srv/data dir"]).scrub("image file not found: /srv/data dir/cat.png")
        'image file not found: <server path>'
    """

    def __init__(self, folders: Iterable[str | os.PathLike] = ()) -> None:
        known = {str(Path(f)) for f in folders if f and str(Path(f)) not in ("/", ".")}
        known |= {tempfile.gettempdir(), str(Path.home()), os.getcwd()}
        # Longest first, so a folder inside another is replaced whole.
        self._known = sorted((k for k in known if k.startswith("/") and len(k) > 1), key=len, reverse=True)
        self._roots: dict[str, bool] = {}

    def _is_server_path(self, match: re.Match) -> str:
        path = match.group(0)
        top = path.split("/")[1]
        if top not in self._roots:
            self._roots[top] = os.path.isdir("/" + top)
        return REDACTED if self._roots[top] else path

    def scrub(self, message: str) -> str:
        for folder in self._known:
            message = re.sub(re.escape(folder) + r"(?:/[^\s'\",;:)]*)?(?![\w.-])", REDACTED, message)
        return _ABSOLUTE.sub(self._is_server_path, message)


def error_body(status: int, message: str) -> bytes:
    """The JSON bytes of an error; a message that is not valid Unicode (a lone surrogate) is written escaped."""
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return json.dumps({"error": {"status": status, "message": safe}}).encode()
