"""Decode and preprocess one image as its model expects. No TensorFlow: Pillow and numpy.

The model's metadata says what it was trained on (input size, color mode, normalization);
any PNG or JPEG of any size and mode is brought to that. The worker checks again what the
producer checked: a message can bypass the producer.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from producer.errors import InvalidImageError
from producer.images import ALLOWED_FORMATS
from producer.registry import ModelInfo


def decode(data: bytes, info: ModelInfo, max_bytes: int, max_pixels: int) -> np.ndarray:
    """``data`` as a float32 array of the model's input shape; :class:`InvalidImageError` if not.

    Size and format are checked from the header before any pixel is decoded, so a hostile
    input costs at most ``max_bytes`` in and ``max_pixels`` decoded.
    """
    if not data:
        raise InvalidImageError("empty image")
    if len(data) > max_bytes:
        raise InvalidImageError(f"image is {len(data)} bytes, over the limit of {max_bytes}")
    height, width, _ = info.input_shape
    try:
        with warnings.catch_warnings():
            # Pillow only warns about large images; the pixel check below decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            if img.format not in ALLOWED_FORMATS:
                raise InvalidImageError(f"image format {img.format} is not accepted")
            pixels = img.size[0] * img.size[1]
            if pixels > max_pixels:
                raise InvalidImageError(
                    f"image is {img.size[0]}x{img.size[1]} = {pixels} pixels, "
                    f"over the limit of {max_pixels}"
                )
            # For JPEG, let the decoder itself scale down: much less work for large photos.
            img.draft(info.color_mode, (width, height))
            img.load()
            converted = _to_mode(img, info.color_mode)
            if converted.size != (width, height):
                converted = converted.resize(
                    (width, height), Image.Resampling.BILINEAR, reducing_gap=3.0
                )
            array = np.asarray(converted, dtype=np.float32)
    except InvalidImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"cannot decode image: {exc}") from exc
    array = array.reshape(info.input_shape)
    return array * np.float32(info.scale) + np.float32(info.offset)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode``; transparent pixels become black, the MNIST background."""
    if img.mode == mode:
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)
