"""Loading models safely and serving them: one compiled forward pass per model version.

TensorFlow is imported here, lazily, inside the worker process that uses it: never in the
Celery parent before it forks, never in a producer.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from producer.errors import BatchContractError, BatcheryError, ModelLoadError
from producer.registry import ModelInfo, Registry, sha256_of
from producer.rollout import Rollout
from worker.tf import tensorflow

log = logging.getLogger(__name__)


class LoadedModel:
    """A model ready to serve: checked, loaded, compiled and warmed up."""

    def __init__(
        self,
        info: ModelInfo,
        forward: Callable[[np.ndarray], np.ndarray],
        batch_size: int,
        keep: Any = None,
        explain: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.info = info
        self._forward = forward
        self.batch_size = batch_size
        self._keep = keep  # the private copy it was loaded from, removed with the model
        #: Attribution maps for (inputs, target class indices), or None (a LiteRT version).
        self.explain = explain

    def predict(
        self, inputs: np.ndarray, observe: Callable[[int, float], None] | None = None
    ) -> np.ndarray:
        """Class probabilities for a stack of preprocessed inputs, ``batch_size`` at a time.

        The batch contract: N inputs give N rows of ``len(labels)`` scores, or this raises.
        ``observe`` is told each forward pass's image count and seconds.
        """
        outputs = []
        for i in range(0, len(inputs), self.batch_size):
            chunk = inputs[i : i + self.batch_size]
            started = time.perf_counter()
            outputs.append(np.asarray(self._forward(chunk)))
            if observe is not None:
                observe(len(chunk), time.perf_counter() - started)
        probs = np.concatenate(outputs) if outputs else np.zeros((0, len(self.info.labels)))
        expected = (len(inputs), len(self.info.labels))
        if probs.shape != expected:
            raise BatchContractError(
                f"{self.info.key}: {len(inputs)} inputs gave outputs of shape {probs.shape}, "
                f"expected {expected}"
            )
        return probs


def read_model(path: Path, fmt: str, trusted: bool) -> Any:
    """Deserialize a model: ``.keras`` in safe mode unless trusted; ``.h5`` and SavedModel
    folders only if trusted (Keras can't check them for code: a SavedModel's graph can hold
    ops that read and write files). A SavedModel is wrapped in a ``TFSMLayer``.
    """
    tf = tensorflow()
    if fmt == "h5" and not trusted:
        raise ModelLoadError(
            f"{path.name} is a legacy .h5 file: Keras safe_mode cannot check it for code; "
            "publish it with --trust only if you trust its source"
        )
    if fmt == "savedmodel" and not trusted:
        raise ModelLoadError(
            f"{path.name} is a SavedModel folder: Keras safe_mode cannot check its graph; "
            "publish it with --trust only if you trust its source"
        )
    try:
        if fmt == "savedmodel":
            layer = tf.keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
            return _SavedModelAdapter(layer, path)
        return tf.keras.models.load_model(path, compile=False, safe_mode=not trusted)
    except Exception as exc:
        if "safe_mode" in str(exc) or "Lambda" in str(exc):
            raise ModelLoadError(
                f"{path.name} holds Python code (a Lambda layer) that Keras safe_mode refuses to "
                "load; publish it with --trust only if you trust its source"
            ) from exc
        raise ModelLoadError(f"cannot load {path.name}: {exc}") from exc


class _SavedModelAdapter:
    """Calls a SavedModel's serving endpoint like a Keras model (first output only)."""

    def __init__(self, layer: Any, path: Path) -> None:
        self.layer = layer
        self.path = str(path)

    def __call__(self, x: Any, training: bool = False) -> Any:
        out = self.layer(x)
        return next(iter(out.values())) if isinstance(out, dict) else out


def worker_kind(settings_kind: str = "auto") -> str:
    """``full`` (TensorFlow installed: every format) or ``lite`` (LiteRT versions only, run by
    ``ai-edge-litert``); ``auto`` picks by whether TensorFlow can be imported."""
    if settings_kind != "auto":
        return settings_kind
    try:
        found = importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        found = False
    return "full" if found else "lite"


def litert_forward(
    model_bytes: bytes, info: ModelInfo, batch_size: int, threads: int | None
) -> Callable[[np.ndarray], np.ndarray]:
    """A forward pass over a LiteRT model: ``batch_size`` rows at most, float in, float out.

    LiteRT's own runtime (``ai-edge-litert``), in both worker kinds: no TensorFlow needed,
    and not TensorFlow's deprecated ``tf.lite.Interpreter``.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise ModelLoadError(
            f"{info.key} is a LiteRT model: install ai-edge-litert (pip install 'batchery[lite]')"
        ) from exc
    interpreter = Interpreter(model_content=model_bytes, num_threads=threads or 1)
    [inp] = interpreter.get_input_details()
    [out] = interpreter.get_output_details()
    interpreter.resize_tensor_input(inp["index"], [batch_size, *info.input_shape])
    interpreter.allocate_tensors()
    padded = np.zeros((batch_size, *info.input_shape), np.float32)
    lock = threading.Lock()  # an interpreter runs one call at a time

    def forward(x: np.ndarray) -> np.ndarray:
        n = len(x)
        with lock:
            padded[:n] = x
            padded[n:] = 0.0
            interpreter.set_tensor(inp["index"], padded)
            interpreter.invoke()
            return np.array(interpreter.get_tensor(out["index"])[:n])

    return forward


def load(info: ModelInfo, batch_size: int, threads: int | None = None) -> LoadedModel:
    """Verify, load, compile and warm up one model version.

    The model is copied to a private folder first, and that copy is hashed and loaded: what
    is loaded is exactly what was checked, whatever happens to the registry meanwhile. Its
    sha256 must match model.json, and Keras loads it with ``safe_mode=True`` unless it was
    published with ``--trust``.
    """
    if not info.file.exists():
        raise ModelLoadError(f"{info.key}: model file {info.file} is missing")
    private = tempfile.TemporaryDirectory(prefix="batchery-model-")  # mode 0700
    copy = Path(private.name) / info.file.name
    try:
        if info.file.is_dir():
            shutil.copytree(info.file, copy, symlinks=True)
        else:
            shutil.copyfile(info.file, copy)
    except OSError as exc:
        private.cleanup()
        raise ModelLoadError(f"{info.key}: cannot read {info.file}: {exc}") from exc
    digest = sha256_of(copy)
    if digest != info.meta.get("sha256"):
        private.cleanup()
        raise ModelLoadError(
            f"{info.key}: sha256 of {info.file.name} is {digest}, model.json says "
            f"{info.meta.get('sha256')}: refusing to load a file that changed after publishing"
        )
    if info.format == "litert":  # a flatbuffer: no Python in it, nothing for safe_mode
        try:
            forward_fn = litert_forward(copy.read_bytes(), info, batch_size, threads)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{info.key}: not a LiteRT model ({exc})") from exc
        finally:
            private.cleanup()
        return _warmed(LoadedModel(info, forward_fn, batch_size), digest)
    try:
        tf = tensorflow(threads)
    except ImportError as exc:
        private.cleanup()
        raise ModelLoadError(
            f"{info.key} is a {info.format} model: this worker has no TensorFlow (a lite "
            "worker serves LiteRT versions only)"
        ) from exc
    try:
        model = read_model(copy, info.format, info.trusted)
    except ModelLoadError as exc:
        private.cleanup()
        raise ModelLoadError(f"{info.key}: {exc}") from exc

    spec = tf.TensorSpec([None, *info.input_shape], tf.float32)

    @tf.function(input_signature=[spec])
    def forward(x: Any) -> Any:
        return model(x, training=False)

    # The traced graph itself: calling it skips tf.function's per-call dispatch (a third of
    # the time of a one-image call).
    graph = forward.get_concrete_function()
    forward_fn = lambda x: graph(tf.constant(x, tf.float32)).numpy()  # noqa: E731
    # A SavedModel may read its folder after loading (assets): its copy lives as long as it.
    keep = private if info.file.is_dir() else None
    if keep is None:
        private.cleanup()
    from worker.explain import attributor

    loaded = LoadedModel(info, forward_fn, batch_size, keep=keep, explain=attributor(model, info))
    return _warmed(loaded, digest)


def _warmed(loaded: LoadedModel, digest: str) -> LoadedModel:
    # Warm up: trace the graph and touch the weights before the first real job waits on it.
    info = loaded.info
    for n in sorted({1, loaded.batch_size}):
        loaded.predict(np.zeros((n, *info.input_shape), np.float32))
    log.info("loaded %s from %s (sha256 %s...)", info.key, info.file, digest[:12])
    return loaded


class ModelCache:
    """The models one worker process serves: loaded on first use, at most ``max_loaded`` kept.

    Jobs that name no version get the promoted one. :meth:`refresh` (run periodically in a
    background thread) notices a new promotion, loads and warms the new version, and only then
    switches new jobs to it; a batch already running keeps the model it resolved.
    """

    def __init__(
        self,
        registry: Registry,
        default_model: str,
        batch_size: int,
        threads: int | None = None,
        pinned: ModelInfo | None = None,
        max_loaded: int = 4,
        on_load: Callable[[ModelInfo], None] | None = None,
    ) -> None:
        self.registry = registry
        self.on_load = on_load
        self.default_model = pinned.name if pinned else default_model
        self.batch_size = batch_size
        self.threads = threads
        self.max_loaded = max(1, max_loaded)
        self._pinned = pinned
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._promoted: dict[str, str] = {}
        self._rollouts: dict[str, Rollout | None] = {}
        self._lock = threading.RLock()
        #: Versions loaded so far: a batch that loaded one ran cold (see worker.budget).
        self.loads = 0

    def resolve(self, name: str | None, version: str | None) -> ModelInfo:
        """The registry entry a job's (model, version) means; ModelNotFoundError if none."""
        name = name or self.default_model
        pinned = self._pinned
        if pinned and name == pinned.name and version in (None, pinned.version):
            return pinned
        if version is None:
            with self._lock:
                version = self._promoted.get(name)
            if version is None:
                version = self.registry.promoted(name)
                with self._lock:
                    self._promoted.setdefault(name, version)
        return self.registry.get(name, version)

    def get(self, name: str | None, version: str | None) -> LoadedModel:
        """The loaded model for a job's (model, version), loading it if needed."""
        name = name or self.default_model
        with self._lock:
            # The hot path: a loaded version needs no registry read.
            key = f"{name}@{version or self._promoted.get(name)}"
            loaded = self._loaded.get(key)
            if loaded is not None:
                self._loaded.move_to_end(key)
                return loaded
        return self._ensure_loaded(self.resolve(name, version))

    def rollout(self, name: str) -> Rollout | None:
        """``name``'s shadow or canary (producer.rollout), as last read from the registry:
        on first use, then by :meth:`refresh`. One that does not verify is ignored."""
        with self._lock:
            if name in self._rollouts:
                return self._rollouts[name]
        found = self._read_rollout(name)
        with self._lock:
            self._rollouts[name] = found
        return found

    def _read_rollout(self, name: str) -> Rollout | None:
        if self._pinned is not None:
            return None
        try:
            raw = self.registry.rollout(name)
        except (BatcheryError, OSError, ValueError) as exc:
            log.error("%s: rollout ignored: %s", name, exc)
            return None
        return Rollout.from_json({**raw, "model": name}) if raw else None

    def loaded_keys(self) -> list[str]:
        """``name@version`` of the models in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def _ensure_loaded(self, info: ModelInfo) -> LoadedModel:
        with self._lock:
            loaded = self._loaded.get(info.key)
            if loaded is not None:
                self._loaded.move_to_end(info.key)
                return loaded
        loaded = load(info, self.batch_size, self.threads)
        self.loads += 1
        if self.on_load is not None:
            self.on_load(info)
        with self._lock:
            self._loaded[info.key] = loaded
            self._loaded.move_to_end(info.key)
            while len(self._loaded) > self.max_loaded:
                evicted, _ = self._loaded.popitem(last=False)
                log.info("unloaded %s (keeping %d models)", evicted, self.max_loaded)
        return loaded

    def refresh(self) -> None:
        """Load newly promoted versions of the models in use, then switch jobs to them.

        Called by the worker's housekeeping thread every ``BATCHERY_MODEL_WATCH_S``.
        """
        if self._pinned is not None:
            return
        with self._lock:
            current = dict(self._promoted)
            rolling = list(self._rollouts)
        for name in rolling:
            found = self._read_rollout(name)
            with self._lock:
                if self._rollouts.get(name) != found:
                    log.info("%s: rollout now %s", name, found)
                self._rollouts[name] = found
        for name, version in current.items():
            try:
                promoted = self.registry.promoted(name)
                if promoted != version:
                    self._ensure_loaded(self.registry.get(name, promoted))
                    with self._lock:
                        self._promoted[name] = promoted
                    log.info("serving %s@%s (was %s)", name, promoted, version)
            except BatcheryError as exc:
                log.error("cannot switch %s to its promoted version: %s", name, exc)
