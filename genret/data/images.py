"""Image loading with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

ImageLike = Union[str, os.PathLike, Image.Image]


class ImageLoadError(ValueError):
    """An image file that is missing or cannot be decoded."""


def load_image(image: ImageLike) -> Image.Image:
    """Open an image (path or PIL image) as RGB, fully decoded.

    Raises:
        ImageLoadError: naming the file, when it is missing or not an image.
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise ImageLoadError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ImageLoadError(f"{path}: not a readable image ({err.__class__.__name__}: {err})") from None


def image_key(image: ImageLike) -> str:
    """A stable content key for caching: the hash of the file's bytes or of the decoded pixels."""
    import hashlib

    h = hashlib.sha1()
    if isinstance(image, Image.Image):
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    else:
        path = Path(image)
        try:
            h.update(path.read_bytes())
        except OSError:
            raise ImageLoadError(f"image file not found: {path}") from None
    return h.hexdigest()
