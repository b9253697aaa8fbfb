"""Image loading: the one decoder every image read in genret goes through, with errors that name the file.

:func:`load_image` turns whatever PIL opens into the RGB image the models see, the same way for every mode:

- 16- and 32-bit greyscale (``I;16``, ``I;16B``, ``I``, ``F``) is scaled to 8 bits by the range of its mode
  (``I;16``: ``v >> 8``; ``I`` holding 16-bit values likewise; ``F`` in 0..1 times 255), not clipped to white;
- transparency (``RGBA``, ``LA``, palette with a transparent colour) is composited on white;
- the EXIF orientation is applied; an animation gives its first frame; CMYK and CIELab go through colour
  profiles;
- an image above :func:`max_image_pixels` (a decompression bomb: a small file that decodes to gigabytes) is
  refused before it is decoded.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, Image.Image]

MAX_PIXELS_ENV = "GENRET_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 8192 * 8192
"""genret's pixel limit (width × height); ``$GENRET_MAX_IMAGE_PIXELS`` changes it. PIL warns past 89 million
pixels and refuses past 179 million; genret refuses anything above its limit, warned or not."""

_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageLoadError(ValueError):
    """An image file that is missing, not an image, too large, or cannot be decoded; the message names it."""


def max_image_pixels() -> int:
    """The largest image genret decodes, in pixels: ``$GENRET_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_PIXELS`."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ImageLoadError(f"{MAX_PIXELS_ENV}={text!r}: expected a whole number of pixels, at least 1 "
                             f"(default {DEFAULT_MAX_PIXELS:,})")
    return value


def load_image(image: ImageLike, max_pixels: int | None = None) -> Image.Image:
    """Open an image (path or PIL image) as RGB, fully decoded (see the module's notes for each mode).

    Args:
        image: a path, or an opened PIL image (converted the same way).
        max_pixels: refuse images above this many pixels (default :func:`max_image_pixels`).

    Raises:
        ImageLoadError: naming the file, when it is missing, not an image, above the pixel limit, or undecodable.

    Example:
        >>> from PIL import Image
        >>> load_image(Image.new("I;16", (2, 2), 32768)).getpixel((0, 0))
        (128, 128, 128)
    """
    limit = max_image_pixels() if max_pixels is None else max_pixels
    if isinstance(image, Image.Image):
        name = getattr(image, "filename", "") or "the image"
        _check_size(image, name, limit)
        return _decode(image, name)
    path = Path(image)
    with _open(path, limit) as img:
        return _decode(img, str(path))


def probe_image(path: str | os.PathLike, max_pixels: int | None = None) -> str | None:
    """Why the file at ``path`` cannot be used as an image, or ``None`` when it can: the checks of :func:`load_image`
    that need no full decode (the file, its format, the pixel limit, the container's integrity)."""
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        with _open(Path(path), limit) as img:
            _guard(img.verify, str(path))
    except ImageLoadError as err:
        return str(err)
    return None


def _open(path: Path, limit: int) -> Image.Image:
    """``Image.open`` with PIL's bomb warning as an error and genret's pixel limit checked (nothing decoded yet)."""
    try:
        if not path.is_file():
            raise ImageLoadError(f"image file not found: {path}")
    except OSError as err:  # e.g. a symlink loop: is_file raises on some Pythons
        raise ImageLoadError(f"{path}: cannot be read ({err.strerror or err}); check the file") from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _guard(lambda: Image.open(path), str(path))
    try:
        _check_size(img, str(path), limit)
    except ImageLoadError:
        img.close()
        raise
    return img


def _check_size(img: Image.Image, name: str, limit: int) -> None:
    width, height = img.size
    if width * height > limit:
        raise ImageLoadError(_too_large(name, f"{width}×{height} = {width * height:,} pixels", limit))


def _too_large(name: str, size: str, limit: int) -> str:
    return (f"{name}: the image is {size}, above genret's limit of {limit:,} pixels (a decompression bomb, or a "
            f"very large scan): shrink it, or raise the limit with {MAX_PIXELS_ENV}")


def _guard(step, name: str):
    """Run one PIL step; whatever it raises on a bad file becomes an :class:`ImageLoadError` naming the file."""
    try:
        return step()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"{name}: refused by PIL's decompression-bomb guard ({err}): shrink the image; PIL "
                             f"decodes at most {Image.MAX_IMAGE_PIXELS:,} pixels without this "
                             f"(PIL.Image.MAX_IMAGE_PIXELS), genret at most {max_image_pixels():,} "
                             f"({MAX_PIXELS_ENV})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not a readable image (PIL cannot identify it: is it the right file? PNG, "
                             "JPEG, WebP, GIF, BMP and TIFF are read); replace it, or leave it out with --on-error "
                             "skip") from None
    except MemoryError:
        raise ImageLoadError(f"{name}: too large to decode in memory; shrink it") from None
    except Exception as err:  # noqa: BLE001 - a damaged file makes PIL raise anything (OSError, struct.error...)
        raise ImageLoadError(f"{name}: not a readable image ({type(err).__name__}: {str(err)[:120]}); replace it, "
                             "or leave it out with --on-error skip") from None


def _decode(img: Image.Image, name: str) -> Image.Image:
    def run() -> Image.Image:
        if getattr(img, "is_animated", False):
            img.seek(0)  # the first frame of a GIF / APNG / WebP animation
        return _to_rgb(ImageOps.exif_transpose(img), name)

    return _guard(run, name)


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    if img.mode in _HIGH_BIT:
        img = _to_8bit(img, name)
    elif img.mode == "LAB":
        img = _profile(img, "LAB")
    elif img.mode == "CMYK" and img.info.get("icc_profile"):
        img = _profile(img, "CMYK")
    if img.mode == "P" or (img.mode not in _ALPHA and "transparency" in img.info):
        img = img.convert("RGBA")  # the palette's (or colour key's) transparent colour becomes alpha
    if img.mode in _ALPHA:
        rgba = (img.convert("LA") if img.mode == "La" else img).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        img = white
    return img.convert("RGB")


def _to_8bit(img: Image.Image, name: str) -> Image.Image:
    """Greyscale of more than 8 bits as ``L``, scaled by the range of its mode (never clipped to white)."""
    import numpy as np

    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        return Image.fromarray((a.astype(np.uint32) >> 8).astype(np.uint8), mode="L")
    if img.mode == "F" and not np.isfinite(a).all():
        raise ImageLoadError(f"{name}: floating-point pixels include NaN or infinity; save it with finite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0 and hi <= 1:
        out = a * 255.0
    elif img.mode == "F" and lo >= 0 and hi <= 255:
        out = a
    elif lo >= 0 and hi <= 65535:  # 16-bit values (how PIL opens 16-bit PGM and TIFF as I)
        out = a.astype(np.float64) / 257.0
    else:
        logger.warning("%s: %s pixels span %g..%g, beyond 16 bits: stretched to 0..255", name, img.mode, lo, hi)
        out = (a.astype(np.float64) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _profile(img: Image.Image, mode: str) -> Image.Image:
    """A CMYK (its embedded ICC profile) or CIELab image in sRGB; PIL's plain convert mistakes their colours."""
    import io

    from PIL import ImageCms

    try:
        if mode == "LAB":
            source = ImageCms.createProfile("LAB")
        else:
            source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
        return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        if mode == "LAB":
            raise
        return img.convert("RGB")  # a broken embedded profile: the plain conversion


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
