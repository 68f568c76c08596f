"""The usual ways, as Celery apps a `celery worker` runs: the baselines of ``batchery bench``.

(a) the tutorial way: one task per image, ``model.predict`` on it, the result returned;
(b) celery-batches, ``flush_every=64``: one task per image, ``model.predict`` on each batch,
    each result stored with the backend.

Both load the same model version folder as Batchery (``BENCH_MODEL_PATH``), after the fork,
and decode images the same way, so only the serving differs. Configured from the environment
because ``celery -A bench.baselines:app worker`` imports this module.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import numpy as np
from celery import Celery, signals
from celery_batches import Batches

from producer.registry import ModelInfo
from worker import preprocess

REDIS_URL = os.environ.get("BATCHERY_REDIS_URL", "redis://localhost:6379/0")
app = Celery("bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=64,
    worker_proc_alive_timeout=300,
    result_expires=3600,
)

_model: Any = None
_info: ModelInfo | None = None


@signals.worker_process_init.connect
def _load(**_: Any) -> None:
    global _model, _info
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    _info = ModelInfo.from_dir(Path(os.environ["BENCH_MODEL_PATH"]))
    _model = tf.keras.models.load_model(_info.file, compile=False)


def _inputs(images_b64: list[str]) -> np.ndarray:
    assert _info is not None
    if os.environ.get("BENCH_FULL_DECODE"):  # the tutorial's way: every pixel, then resize
        from bench.photos import full_decode

        height, width, _ = _info.input_shape
        pixels = [np.asarray(full_decode(base64.b64decode(b), (width, height), _info.color_mode))
                  for b in images_b64]  # fmt: skip
    else:
        pixels = [preprocess.decode(base64.b64decode(b), _info, 1 << 30, 1 << 30)
                  for b in images_b64]  # fmt: skip
    return preprocess.normalize(np.stack(pixels), _info)


def _answer(row: np.ndarray) -> dict[str, Any]:
    assert _info is not None
    best = int(row.argmax())
    return {"label": _info.labels[best], "score": float(row[best])}


@app.task(name="bench.tutorial")
def tutorial(image_b64: str) -> dict[str, Any]:
    """The tutorial way: ``model.predict`` on one image."""
    return _answer(_model.predict(_inputs([image_b64]), verbose=0)[0])


@app.task(name="bench.batches", base=Batches, flush_every=64, flush_interval=0.25)
def batches(requests: list[Any]) -> None:
    """celery-batches' way: ``model.predict`` on the batch, one stored result per request."""
    probs = _model.predict(_inputs([r.args[0] for r in requests]), verbose=0)
    for request, row in zip(requests, probs, strict=True):
        app.backend.mark_as_done(request.id, _answer(row), request=request)
