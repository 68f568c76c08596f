"""Decode and preprocess images as their model expects. No TensorFlow: Pillow and numpy.

The model's metadata says what it was trained on (input size, color mode, normalization);
any accepted image of any size and mode is brought to that. The worker checks again what the
producer checked: a message can bypass the producer.

Decoding is per image (a broken one fails alone); normalization is per batch (one vectorized
operation for all of a forward pass's inputs).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

from producer.errors import InvalidImageError
from producer.images import ALLOWED_FORMATS, check_image_bytes
from producer.registry import ModelInfo

_FORMATS = sorted(ALLOWED_FORMATS)

#: Modes Pillow resizes with any filter; others are converted (to RGB or RGBA) first.
_RESIZABLE = frozenset({"L", "LA", "RGB", "RGBA", "I", "F"})


def limit_pillow(max_pixels: int) -> None:
    """Make Pillow itself refuse images over ``max_pixels``, on every path that opens one.

    Pillow raises its bomb error only past twice its limit and warns below that: its limit is
    set to ours and the warning made an error, so both refuse at exactly ``max_pixels``.
    Called once per worker process (the limit is Pillow's, process-wide).
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def decode(data: bytes, info: ModelInfo, max_bytes: int, max_pixels: int) -> np.ndarray:
    """``data`` as uint8 pixels of the model's input shape; :class:`InvalidImageError` if not.

    Size, format, pixel count and completeness are checked from the file's structure before
    any pixel is decoded (the producer's own check, run again), then Pillow checks the pixel
    count once more on its own reading of the header: a hostile input costs at most
    ``max_bytes`` in and ``max_pixels`` decoded. The image is brought to the model's size in
    its own mode before any conversion, so decoding peaks near its decoded size (up to 4
    bytes a pixel, for RGBA) instead of several copies of it.
    """
    check_image_bytes(data, "image", max_bytes, max_pixels)
    height, width, _ = info.input_shape
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as img:
            pixels = img.size[0] * img.size[1]
            if pixels > max_pixels:
                raise InvalidImageError(
                    f"image is {img.size[0]}x{img.size[1]} = {pixels} pixels, "
                    f"over the limit of {max_pixels}"
                )
            if img.size != (width, height):
                # For JPEG, let the decoder itself scale down: much less work for big photos.
                img.draft(info.color_mode, (width, height))
            img.load()
            small: Image.Image = img
            if img.size != (width, height):
                if img.mode not in _RESIZABLE:
                    small = small.convert("RGBA" if _transparent(img) else "RGB")
                # RGBA and LA are resized premultiplied: composing over black afterwards
                # gives what composing first would, on 784 pixels instead of millions.
                small = small.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
            converted = _to_mode(small, info.color_mode)
            array = np.frombuffer(converted.tobytes(), np.uint8)
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"image refused by Pillow's pixel limit: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"cannot decode image: not one of {', '.join(sorted(ALLOWED_FORMATS))}"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"cannot decode image: {exc}") from exc
    return array.reshape(info.input_shape)


def normalize(pixels: np.ndarray, info: ModelInfo) -> np.ndarray:
    """A stack of uint8 inputs as the float32 values the model was trained on."""
    return pixels.astype(np.float32) * np.float32(info.scale) + np.float32(info.offset)


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode``; transparent pixels become black, the MNIST background."""
    if img.mode == mode:
        return img
    if _transparent(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def _transparent(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
