"""Loading models safely and serving them: one compiled forward pass per model version.

TensorFlow is imported here, lazily, inside the worker process that uses it: never in the
Celery parent before it forks, never in a producer.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from producer.errors import BatchContractError, ModelLoadError
from producer.registry import ModelInfo, Registry, sha256_of

log = logging.getLogger(__name__)

_tf_lock = threading.Lock()
_tf_configured = False


def tensorflow(threads: int | None = None) -> Any:
    """Import TensorFlow once per process, quietly, with ``threads`` intra-op threads."""
    global _tf_configured
    with _tf_lock:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if not _tf_configured:
            if threads:
                # Several worker processes share the cores: each keeps to its share.
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(max(1, min(threads, 2)))
            _tf_configured = True
        return tf


class LoadedModel:
    """A model ready to serve: checked, loaded, compiled and warmed up."""

    def __init__(
        self, info: ModelInfo, forward: Callable[[np.ndarray], np.ndarray], batch_size: int
    ) -> None:
        self.info = info
        self._forward = forward
        self.batch_size = batch_size

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities for a stack of preprocessed inputs, ``batch_size`` at a time.

        The batch contract: N inputs give N rows of ``len(labels)`` scores, or this raises.
        """
        outputs = [
            np.asarray(self._forward(inputs[i : i + self.batch_size]))
            for i in range(0, len(inputs), self.batch_size)
        ]
        probs = np.concatenate(outputs) if outputs else np.zeros((0, len(self.info.labels)))
        expected = (len(inputs), len(self.info.labels))
        if probs.shape != expected:
            raise BatchContractError(
                f"{self.info.key}: {len(inputs)} inputs gave outputs of shape {probs.shape}, "
                f"expected {expected}"
            )
        return probs


def load(info: ModelInfo, batch_size: int, threads: int | None = None) -> LoadedModel:
    """Verify, load, compile and warm up one model version.

    The file's sha256 must match its model.json, and Keras loads it with ``safe_mode=True``
    (no arbitrary code from the file).
    """
    if not info.file.exists():
        raise ModelLoadError(f"{info.key}: model file {info.file} is missing")
    digest = sha256_of(info.file)
    if digest != info.meta.get("sha256"):
        raise ModelLoadError(
            f"{info.key}: sha256 of {info.file.name} is {digest}, model.json says "
            f"{info.meta.get('sha256')}: refusing to load a file that changed after publishing"
        )
    tf = tensorflow(threads)
    try:
        model = tf.keras.models.load_model(info.file, compile=False, safe_mode=True)
    except Exception as exc:
        raise ModelLoadError(f"{info.key}: cannot load {info.file.name}: {exc}") from exc

    spec = tf.TensorSpec([None, *info.input_shape], tf.float32)

    @tf.function(input_signature=[spec], reduce_retracing=True)
    def forward(x: Any) -> Any:
        return model(x, training=False)

    loaded = LoadedModel(info, lambda x: forward(tf.constant(x, tf.float32)).numpy(), batch_size)
    # Warm up: trace the graph and touch the weights before the first real job waits on it.
    for n in sorted({1, batch_size}):
        loaded.predict(np.zeros((n, *info.input_shape), np.float32))
    log.info("loaded %s from %s (sha256 %s...)", info.key, info.file, digest[:12])
    return loaded


class ModelCache:
    """The models one worker process serves, loaded on first use and kept loaded."""

    def __init__(
        self,
        registry: Registry,
        default_model: str,
        batch_size: int,
        threads: int | None = None,
        pinned: ModelInfo | None = None,
    ) -> None:
        self.registry = registry
        self.default_model = pinned.name if pinned else default_model
        self.batch_size = batch_size
        self.threads = threads
        self._pinned = pinned
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()

    def resolve(self, name: str | None, version: str | None) -> ModelInfo:
        """The registry entry a job's (model, version) means; ModelNotFoundError if none."""
        name = name or self.default_model
        pinned = self._pinned
        if pinned and name == pinned.name and version in (None, pinned.version):
            return pinned
        return self.registry.get(name, version)

    def get(self, name: str | None, version: str | None) -> LoadedModel:
        """The loaded model for a job's (model, version), loading it if needed."""
        info = self.resolve(name, version)
        loaded = self._loaded.get(info.key)
        if loaded is None:
            loaded = load(info, self.batch_size, self.threads)
            self._loaded[info.key] = loaded
        return loaded
