"""Explanations: which pixels of its input a job's predicted class rests on.

A job submitted with ``explain=True`` gets, beside its label, an attribution map over the
model's input for the predicted class: Integrated Gradients from a black image (the MNIST
background), ``STEPS`` steps, computed for all the explained jobs of a batch in one
batched gradient pass. It travels as a small grayscale PNG (brighter: more of the class's
score rests on that pixel). Jobs without ``explain`` cost nothing more. A gradient pass
holds as many images as a forward pass (``batch_size // STEPS`` jobs), so explanations take
no more memory than predictions.

Integrated Gradients was chosen by the deletion test (``tests/unit/test_explain.py``):
deleting the pixels it ranks highest lowers the predicted class's probability far more than
deleting as many random ink pixels, and more than gradient x input does.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from producer.registry import ModelInfo

METHOD = "integrated-gradients"
#: Interpolation steps from the black baseline to the input.
STEPS = 16

#: attributions(inputs, targets) -> one map per input, the inputs' shape.
Attributor = Callable[[np.ndarray, np.ndarray], np.ndarray]


def attributor(model: Any, info: ModelInfo) -> Attributor:
    """Integrated Gradients for ``model`` (a Keras model), traced once per worker process."""
    from worker.tf import tensorflow

    tf = tensorflow()
    spec = tf.TensorSpec([None, *info.input_shape], tf.float32)
    alphas = tf.reshape(tf.linspace(1.0 / STEPS, 1.0, STEPS), [STEPS, 1, 1, 1, 1])

    @tf.function(input_signature=[spec, tf.TensorSpec([None], tf.int32)])
    def integrated_gradients(x: Any, target: Any) -> Any:
        # All the steps of all the inputs in one batched pass: (steps * n, h, w, c).
        path = tf.reshape(alphas * x[tf.newaxis], [-1, *info.input_shape])
        targets = tf.tile(target, [STEPS])
        with tf.GradientTape() as tape:
            tape.watch(path)
            scores = tf.gather(model(path, training=False), targets, batch_dims=1)
        grads = tf.reshape(tape.gradient(scores, path), [STEPS, -1, *info.input_shape])
        return x * tf.reduce_mean(grads, axis=0)  # baseline 0: (x - 0) * mean gradient

    def attribute(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        out = integrated_gradients(tf.constant(inputs, tf.float32), tf.constant(targets, tf.int32))
        return np.asarray(out)

    return attribute


def heatmap(attribution: np.ndarray) -> np.ndarray:
    """An attribution map as uint8 pixels: positive evidence, scaled to its maximum."""
    positive = np.clip(attribution.sum(axis=-1), 0.0, None)
    peak = float(positive.max())
    scaled = positive / peak if peak > 0 else positive
    return np.rint(scaled * 255.0).astype(np.uint8)


def explanation(attribution: np.ndarray, target: str) -> dict[str, Any]:
    """The ``explanation`` of a result: method, target label, size and the map as a PNG."""
    pixels = heatmap(attribution)
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format="PNG")
    height, width = pixels.shape
    return {
        "method": METHOD,
        "target": target,
        "width": width,
        "height": height,
        "png": base64.b64encode(out.getvalue()).decode("ascii"),
    }
