"""Optimising a published Keras version for serving: LiteRT (TFLite) conversion, measured.

``batchery models optimize NAME[@VERSION] --to float16|dynamic-int8|int8`` converts the
version with TensorFlow's own converter (``tf.lite``) and publishes the result as the next
version of the same name, not promoted. ``int8`` quantizes weights and activations with a
representative dataset read through the model's own preprocessing; the model keeps float
inputs and outputs, so workers feed it exactly what they feed the Keras version. With a test
folder, ``model.json`` records the accuracy of both versions and how often they agree.

Workers serve a LiteRT version through ``worker.models.litert_forward``: one interpreter
per worker process, with its share of the cores, resized once to the batch size (a smaller
batch is padded), behind the same ``LoadedModel`` as a Keras model.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from producer.errors import ModelLoadError
from producer.registry import ModelInfo, Registry
from worker.models import LoadedModel, litert_forward, load, read_model, tensorflow
from worker.publish import folder_labels
from worker.train import load_folder

METHODS = ("float16", "dynamic-int8", "int8")
#: Calibration images fed to the int8 converter, at most.
CALIBRATION_IMAGES = 500


def convert(info: ModelInfo, method: str, calibration_dir: Path | None = None) -> bytes:
    """The LiteRT flatbuffer of a published Keras version, optimised by ``method``."""
    if method not in METHODS:
        raise ModelLoadError(f"--to {method!r}: use one of {', '.join(METHODS)}")
    if info.format not in ("keras", "h5"):
        raise ModelLoadError(f"{info.key} is a {info.format} version: optimise a Keras one")
    if method == "int8" and calibration_dir is None:
        raise ModelLoadError("--to int8 needs --calibration-dir (images in <label>/ folders)")
    tf = tensorflow()
    model = read_model(info.file, info.format, info.trusted)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if method == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif method == "int8":
        assert calibration_dir is not None
        data = load_folder(calibration_dir, info, labels=folder_labels(calibration_dir, info))
        rng = np.random.default_rng(0)
        sample = data.x[rng.permutation(len(data.x))[:CALIBRATION_IMAGES]]

        def representative() -> Iterator[list[np.ndarray]]:
            for row in sample:
                yield [row[np.newaxis].astype(np.float32)]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with contextlib.redirect_stdout(sys.stderr):  # the converter prints: keep stdout the CLI's
        flatbuffer: bytes = converter.convert()
    return flatbuffer


def optimize(
    registry: Registry,
    info: ModelInfo,
    method: str,
    calibration_dir: Path | None = None,
    test_dir: Path | None = None,
    batch_size: int = 64,
) -> ModelInfo:
    """Convert ``info`` by ``method`` and publish it as the next version, not promoted."""
    flatbuffer = convert(info, method, calibration_dir)
    record: dict[str, Any] = {
        "source_version": info.version,
        "method": method,
        "bytes": len(flatbuffer),
        "source_bytes": info.file.stat().st_size,
    }
    if test_dir is not None:
        record.update(compare(info, flatbuffer, test_dir, batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "model.tflite"
        file.write_bytes(flatbuffer)
        extra = {"format": "litert", "trusted": False, "optimized": record,
                 "source": f"{info.key} ({method})"}  # fmt: skip
        for key in ("training", "metrics"):
            if key in info.meta:
                extra[f"source_{key}"] = info.meta[key]
        return registry.publish(file, info.name, info.labels, info.input_shape,
                                info.color_mode, info.scale, info.offset, extra=extra)  # fmt: skip


def compare(info: ModelInfo, flatbuffer: bytes, test_dir: Path, batch: int) -> dict[str, Any]:
    """Accuracy of the source and of the converted model on ``test_dir``, and agreement."""
    data = load_folder(test_dir, info, labels=folder_labels(test_dir, info))
    truth = np.asarray([info.labels.index(data.labels[i]) for i in data.y])
    source = load(info, batch).predict(data.x).argmax(axis=1)
    converted = LoadedModel(info, litert_forward(flatbuffer, info, batch, None), batch)
    optimized = converted.predict(data.x).argmax(axis=1)
    return {
        "test_dir": str(test_dir),
        "test_images": len(truth),
        "accuracy": round(float((optimized == truth).mean()), 4),
        "source_accuracy": round(float((source == truth).mean()), 4),
        "agreement": round(float((optimized == source).mean()), 4),
    }
