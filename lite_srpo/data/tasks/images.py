"""Open any image a dataset row can point at and return a fully loaded RGB PIL image.

Datasets reference images in many ways (a path, raw bytes, a Hugging Face ``{"bytes", "path"}``
dict, a ``data:`` URI, an already decoded PIL image) and in many modes (16-bit greyscale, CMYK,
palette with transparency, float). Everything downstream assumes 8-bit RGB, so this module is the one
place that normalises them and turns every failure into a :class:`DataError` naming the row.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from lite_srpo.errors import DataError

DEFAULT_MAX_PIXELS = 50_000_000
"""Images with more pixels than this are refused (decompression-bomb guard, ~7000x7000)."""

_WHITE = (255, 255, 255)


def load_image(
    src: Any,
    *,
    where: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    root: str | Path | None = None,
) -> Image.Image:
    """Load ``src`` as an RGB image with EXIF orientation applied.

    ``src`` is a path (relative paths are resolved against ``root``), ``bytes``, a ``data:image/...;base64``
    URI, a dict with ``"bytes"`` and/or ``"path"`` (the Hugging Face ``Image`` feature, also how Parquet
    stores embedded images), or a PIL image. ``where`` (e.g. ``"data.jsonl row 7"``) starts every error.
    """
    if isinstance(src, Image.Image):
        return _to_rgb(_oriented(_checked_size(src, where, max_pixels), where), where)
    if isinstance(src, dict):
        data, path = src.get("bytes"), src.get("path")
        if data is not None:
            return load_image(data, where=where, max_pixels=max_pixels, root=root)
        if path:
            return load_image(path, where=where, max_pixels=max_pixels, root=root)
        raise DataError(f"{where}: image dict has neither 'bytes' nor 'path'")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _open(io.BytesIO(bytes(src)), where, "embedded image bytes", max_pixels)
    if isinstance(src, (str, Path)):
        text = str(src)
        if text.startswith("data:"):
            return _open(io.BytesIO(_decode_data_uri(text, where)), where, "data URI", max_pixels)
        if text.startswith(("http://", "https://")):
            raise DataError(f"{where}: image '{_short(text)}' is a URL; download it and use a local path")
        return _open(_resolve(text, root, where), where, f"image '{_short(text)}'", max_pixels)
    raise DataError(f"{where}: image must be a path, bytes, a {{'bytes','path'}} dict or a PIL image, "
                    f"got {type(src).__name__}")


def _resolve(text: str, root: str | Path | None, where: str) -> Path:
    if not text.strip():
        raise DataError(f"{where}: image path is empty")
    base = Path(root).resolve() if root is not None else Path.cwd()
    try:
        path = Path(text).expanduser()
        path = path if path.is_absolute() else base / path
        exists = path.is_file()
    except (OSError, ValueError) as exc:  # NUL bytes, names too long, ...
        raise DataError(f"{where}: image path '{_short(text)}' is not usable ({exc})") from None
    if not exists:
        looked = path.parent if Path(text).is_absolute() else base
        raise DataError(f"{where}: image '{_short(text)}' not found (looked in {looked})")
    return path


def _decode_data_uri(text: str, where: str) -> bytes:
    head, sep, payload = text.partition(",")
    if not sep or not head.endswith(";base64"):
        raise DataError(f"{where}: data URI must look like 'data:image/png;base64,<data>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{where}: data URI is not valid base64 ({exc})") from None


def _open(fp: Path | io.BytesIO, where: str, what: str, max_pixels: int) -> Image.Image:
    """Open lazily, check the size before decoding, then decode fully so truncation surfaces here."""
    try:
        with warnings.catch_warnings():
            # Our own pixel limit replaces PIL's global one; keep its warning out of the user's log.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                _checked_size(im, where, max_pixels, what)
                im.load()
                im = _oriented(im, where)  # a new image, detached from the file
    except DataError:
        raise
    except Image.DecompressionBombError as exc:
        raise DataError(f"{where}: {what} is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, Image.UnidentifiedImageError) as exc:
        raise DataError(f"{where}: {what} is unreadable or truncated ({type(exc).__name__}: {exc})") from None
    return _to_rgb(im, where)


def _checked_size(im: Image.Image, where: str, max_pixels: int, what: str = "image") -> Image.Image:
    width, height = im.size
    if width <= 0 or height <= 0:
        raise DataError(f"{where}: {what} has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise DataError(f"{where}: {what} is {width}x{height} = {width * height} pixels, over the limit of "
                        f"{max_pixels} (decompression-bomb guard; raise max_pixels if the file is trusted)")
    return im


def _oriented(im: Image.Image, where: str) -> Image.Image:
    """Apply the EXIF orientation tag, so a phone photo shows the way it was taken."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception as exc:  # broken EXIF blocks raise assorted errors inside PIL
        raise DataError(f"{where}: image has unreadable EXIF data ({type(exc).__name__}: {exc})") from None


def _to_rgb(im: Image.Image, where: str) -> Image.Image:
    """Convert every PIL mode to 8-bit RGB; transparent pixels become white, not black."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(im), mode), mode="L").convert("RGB")
    try:
        return im.convert("RGB")  # L, P, 1, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as exc:
        raise DataError(f"{where}: cannot convert image mode {mode} to RGB ({exc})") from None


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map integer / float greyscale to 0..255.

    16-bit modes (``I;16*``) divide by 257 (65535 -> 255). Mode ``I`` (32-bit) is read as 8-bit if it
    fits 0..255, as 16-bit if it fits 0..65535, else min-max stretched. Mode ``F`` in [0, 1] is scaled by
    255, anything else is min-max stretched; NaN becomes 0.
    """
    x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scaled = x / 257.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = x * 255.0
    elif mode != "F" and lo >= 0 and hi <= 255:
        scaled = x
    elif mode != "F" and lo >= 0 and hi <= 65535:
        scaled = x / 257.0
    else:
        scaled = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
