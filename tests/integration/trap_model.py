"""A real model that kills or hangs its worker process for one particular input.

The shipped CNN behind a ``Lambda`` layer (Python code: publishable only with ``--trust``)
that, for an image whose four corners are white, calls ``os._exit``; for an image whose top
corners alone are white, sleeps for an hour. Every other image is classified as the shipped
model does. MNIST digits have black corners, so only the crafted images trip it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.factories import digit_image, digit_paths, encode

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "mnist-cnn" / "1" / "model.keras"
LABELS = [str(d) for d in range(10)]


# A lambda, not a def: Keras stores a lambda's code in the file (a def only by name, which
# the worker could not import). The code runs in the worker, as a trusted model's may.
TRAP = lambda x: __import__("tensorflow").ensure_shape(  # noqa: E731
    __import__("tensorflow").numpy_function(
        lambda a: (
            __import__("os")._exit(17)
            if ((a[:, 0, 0, 0] > 0.99) & (a[:, 0, -1, 0] > 0.99)
                & (a[:, -1, 0, 0] > 0.99) & (a[:, -1, -1, 0] > 0.99)).any()
            else (__import__("time").sleep(3600) or a)
            if ((a[:, 0, 0, 0] > 0.99) & (a[:, 0, -1, 0] > 0.99)).any()
            else a
        ),
        [x], "float32", stateful=True,
    ),
    [None, 28, 28, 1],
)  # fmt: skip


def build(path: Path) -> Path:
    """Write the trap model to ``path`` (a ``.keras`` file)."""
    return shipped_behind(TRAP, path)


def shipped_behind(layer: Any, path: Path) -> Path:
    """The shipped CNN behind a ``Lambda`` of ``layer``, written to ``path`` (``.keras``)."""
    from worker.models import tensorflow

    tf = tensorflow()
    shipped = tf.keras.models.load_model(SHIPPED, compile=False)
    inputs = tf.keras.Input((28, 28, 1))
    outputs = shipped(tf.keras.layers.Lambda(layer, output_shape=(28, 28, 1))(inputs))
    tf.keras.Model(inputs, outputs).save(path)
    return path


def marked(corners: str) -> bytes:
    """A real digit with white corners: ``"all"`` kills the process, ``"top"`` hangs it."""
    pixels = np.asarray(digit_image(digit_paths(1)[0])).copy()
    pixels[0, 0] = pixels[0, -1] = 255
    if corners == "all":
        pixels[-1, 0] = pixels[-1, -1] = 255
    return encode(Image.fromarray(pixels, mode="L"))
