"""What a request may carry: images as base64 or ``data:`` URLs or uploaded bytes, checked before any model sees
them, and kept in a folder of the request's own under their content hash (never a path from the request)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import shutil
import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from genret.data.images import load_image
from genret.serve.errors import RequestError


FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


def image_bytes(value: str, where: str) -> bytes:
    """The bytes of a base64 image or a ``data:image/...;base64,`` URL; a remote URL is refused (never fetched)."""
    if not isinstance(value, str) or not value:
        raise RequestError(400, f"{where}: expected an image as base64 or a data: URL")
    if value.startswith(("http://", "https://", "file:")):
        raise RequestError(400, f"{where}: genret does not fetch URLs from a request; send the image itself as "
                                "base64 or a data:image/...;base64, URL")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if ";base64" not in head:
            raise RequestError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: not valid base64") from None


def check_image(data: bytes, where: str, max_pixels: int) -> str:
    """Open the image (header first: its size is checked before decoding, the decompression-bomb guard), decode it
    fully, and return its file suffix.

    Raises:
        RequestError: 413 above ``max_pixels``, 400 for bytes that are not an image PIL reads.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise RequestError(413, f"{where}: the image is {width}×{height} = {width * height:,} pixels, above "
                                        f"the server's limit of {max_pixels:,}; send a smaller one")
            fmt = img.format
            load_image(img, max_pixels)  # decoded as every image genret reads is (modes, frames, bombs)
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RequestError(400, f"{where}: not a readable image ({err.__class__.__name__}); send PNG, JPEG or "
                                "WebP bytes") from None
    if fmt not in FORMATS:
        raise RequestError(400, f"{where}: image format {fmt} is not accepted; send PNG, JPEG or WebP")
    return FORMATS[fmt]


class Spool:
    """The server's spool folder; each request gets its own folder in it (:meth:`open`), removed when the request
    ends, so no request ever reads, replaces or removes another's files."""

    def __init__(self, max_pixels: int = 4096 * 4096) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="genret-serve-"))
        self.max_pixels = max_pixels

    def open(self) -> "RequestFiles":
        """A new folder for one request's images."""
        return RequestFiles(Path(tempfile.mkdtemp(prefix="request-", dir=self.folder)), self.max_pixels)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class RequestFiles:
    """One request's checked images, as files named by their SHA-256 in the request's own folder (an image sent
    twice in one request is one file); :meth:`close` removes them all."""

    def __init__(self, folder: Path, max_pixels: int) -> None:
        self.folder, self.max_pixels = folder, max_pixels

    def put(self, data: bytes, where: str) -> str:
        """Check ``data`` and return the path of its copy."""
        suffix = check_image(data, where, self.max_pixels)
        path = self.folder / (hashlib.sha256(data).hexdigest() + suffix)
        if not path.is_file():
            path.write_bytes(data)
        return str(path)

    def put_value(self, value: str, where: str) -> str:
        """:meth:`put` for a base64 string or data: URL."""
        return self.put(image_bytes(value, where), where)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
