"""Reading and checking inputs on the producer side: paths, bytes, PIL images, arrays.

A producer refuses what it can't send before anything is enqueued. The worker checks again
(see ``worker.preprocess``): a message can bypass the producer.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from PIL import Image, UnidentifiedImageError

from producer.errors import InvalidImageError

#: Formats accepted end to end. Pillow reads many more; each one is attack surface.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP"})

#: File name extensions a directory walk picks up.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

ImageInput: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
)


def describe(image: Any) -> str:
    """A short name for an input, for error messages (never its bytes)."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {image.shape} {image.dtype}>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.size[0]}x{image.size[1]} {image.mode}>"
    return f"<{type(image).__name__}>"


def image_bytes(image: ImageInput, max_bytes: int) -> bytes:
    """The encoded image bytes to send for ``image``, checked; :class:`InvalidImageError` if not.

    Paths and bytes are sent as they are (the worker decodes them); PIL images and arrays are
    encoded losslessly as PNG.
    """
    name = describe(image)
    if isinstance(image, (str, os.PathLike)):
        data = _read_file(Path(image), max_bytes)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, Image.Image):
        data = _png(image)
    elif isinstance(image, np.ndarray):
        data = _png(Image.fromarray(_as_uint8_image(image)))
    else:
        raise InvalidImageError(f"{name}: expected a path, bytes, a PIL image or a numpy array")
    check_image_bytes(data, name, max_bytes)
    return data


def sniff_format(data: bytes) -> str | None:
    """The allowed format ``data`` starts like (PNG, JPEG, WEBP, BMP), from its magic bytes.

    Microseconds, where opening with Pillow costs a hundred: the bulk path checks every file.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def check_image_bytes(data: bytes, name: str, max_bytes: int) -> str:
    """Check size and format from the first bytes alone; return the format name."""
    if not data:
        raise InvalidImageError(f"{name}: empty input")
    if len(data) > max_bytes:
        raise InvalidImageError(
            f"{name}: {len(data)} bytes is over the limit of {max_bytes} bytes "
            "(BATCHERY_MAX_IMAGE_BYTES)"
        )
    fmt = sniff_format(data)
    if fmt is not None:
        return fmt
    # Not an accepted format: let Pillow name what it is, for a useful message.
    try:
        with Image.open(io.BytesIO(data)) as img:
            other = img.format or "unknown"
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidImageError(f"{name}: not a readable image ({exc})") from exc
    allowed = ", ".join(sorted(ALLOWED_FORMATS))
    raise InvalidImageError(f"{name}: format {other} is not accepted (allowed: {allowed})")


def _read_file(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidImageError(
                f"{path}: {size} bytes is over the limit of {max_bytes} bytes "
                "(BATCHERY_MAX_IMAGE_BYTES)"
            )
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise InvalidImageError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise InvalidImageError(f"{path}: is a directory, not an image file") from exc
    except PermissionError as exc:
        raise InvalidImageError(f"{path}: permission denied") from exc


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _as_uint8_image(array: np.ndarray) -> np.ndarray:
    """An HxW, HxWx1, HxWx3 or HxWx4 array as uint8 pixels (floats must lie in [0, 1])."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImageError(
            f"<array {array.shape}>: expected HxW, HxWx1, HxWx3 or HxWx4 pixels"
        )
    if array.size == 0:
        raise InvalidImageError(f"<array {array.shape}>: empty array")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise InvalidImageError(
                f"<array {array.shape} {array.dtype}>: float pixels must lie in [0, 1]"
            )
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise InvalidImageError(
                f"<array {array.shape} {array.dtype}>: integer pixels must lie in [0, 255]"
            )
        return array.astype(np.uint8)
    raise InvalidImageError(f"<array {array.dtype}>: unsupported pixel type")
