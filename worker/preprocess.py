"""Decode and preprocess images as their model expects. No TensorFlow: Pillow and numpy.

The model's metadata says what it was trained on (input size, color mode, normalization);
any accepted image of any size and mode is brought to that. The worker checks again what the
producer checked: a message can bypass the producer.

Decoding is per image (a broken one fails alone); normalization is per batch (one vectorized
operation for all of a forward pass's inputs).
"""

from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from producer.images import decode_to_size
from producer.registry import ModelInfo


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

    See :func:`producer.images.decode_to_size`: checked from the file's structure first,
    decoded at the smallest scale the model can use, brought to its size in its own mode
    before any conversion.
    """
    height, width, _ = info.input_shape
    img = decode_to_size(data, (width, height), info.color_mode, max_bytes, max_pixels)
    return np.frombuffer(img.tobytes(), np.uint8).reshape(info.input_shape)


def normalize(pixels: np.ndarray, info: ModelInfo) -> np.ndarray:
    """A stack of uint8 inputs as the float32 values the model was trained on."""
    return pixels.astype(np.float32) * np.float32(info.scale) + np.float32(info.offset)
