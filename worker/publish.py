"""Publishing model files into the registry, and evaluating a published version on a folder.

Both load the model with TensorFlow, so they live on the worker side; ``batchery models
publish`` and ``batchery models evaluate`` import this lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from producer.errors import ModelLoadError
from producer.registry import ModelInfo, Registry
from worker import preprocess
from worker.models import load, read_model, tensorflow
from worker.train import load_folder


def model_format(path: Path) -> str:
    """``keras``, ``h5`` or ``savedmodel`` from the path; ModelLoadError for anything else."""
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "savedmodel"
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return "keras"
    if suffix in (".h5", ".hdf5"):
        return "h5"
    raise ModelLoadError(
        f"{path}: not a model file (expected .keras, a SavedModel folder, or .h5 with --trust)"
    )


def read_labels(value: str) -> list[str]:
    """Labels from a comma list, or from a file with one label a line."""
    path = Path(value)
    if path.is_file():
        labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        labels = [part.strip() for part in value.split(",") if part.strip()]
    if not labels:
        raise ModelLoadError(f"no labels in {value!r}")
    return labels


def publish_model(
    registry: Registry,
    source: Path,
    name: str,
    labels: Sequence[str],
    trust: bool = False,
    color_mode: str | None = None,
    scale: float = 1.0 / 255.0,
    offset: float = 0.0,
    batch_budget_ms: float | None = None,
) -> ModelInfo:
    """Check that ``source`` loads (safely unless ``trust``) and fits ``labels``, then publish.

    Input shape comes from the model; color mode from its channels (1: L, 3: RGB) unless given.
    ``batch_budget_ms``: this version's own batch budget (see worker.budget), in its manifest.
    """
    if batch_budget_ms is not None and not batch_budget_ms > 0:
        raise ModelLoadError(f"--batch-budget-ms {batch_budget_ms:g}: give a positive number")
    source = Path(source)
    if not source.exists():
        raise ModelLoadError(f"{source}: no such file")
    fmt = model_format(source)
    model = read_model(source, fmt, trusted=trust)
    input_shape, outputs = _shapes(model, fmt)
    if outputs != len(labels):
        raise ModelLoadError(
            f"{source.name} has {outputs} outputs but {len(labels)} labels were given"
        )
    if color_mode is None:
        color_mode = {1: "L", 3: "RGB"}.get(input_shape[2], "")
    if color_mode not in ("L", "RGB") or {"L": 1, "RGB": 3}[color_mode] != input_shape[2]:
        raise ModelLoadError(f"{source.name}: input shape {input_shape} is not an L or RGB image")
    return registry.publish(
        source, name, labels, input_shape, color_mode, scale, offset,
        extra={"format": fmt, "trusted": trust, "source": source.name,
               **({} if batch_budget_ms is None else {"batch_budget_ms": batch_budget_ms})},
    )  # fmt: skip


def _shapes(model: Any, fmt: str) -> tuple[tuple[int, int, int], int]:
    if fmt == "savedmodel":
        signature = tensorflow().saved_model.load(model.path).signatures["serving_default"]
        (input_spec,) = signature.structured_input_signature[1].values()
        (output_spec, *_) = signature.structured_outputs.values()
        shape = tuple(input_spec.shape[1:])
        outputs = output_spec.shape[-1]
    else:
        shape, outputs = tuple(model.input_shape[1:]), model.output_shape[-1]
    if len(shape) != 3 or any(d is None for d in shape):
        raise ModelLoadError(f"model input shape {model.input_shape} is not HxWxC")
    return (int(shape[0]), int(shape[1]), int(shape[2])), int(outputs)


@dataclass(frozen=True)
class Evaluation:
    """Accuracy and confusion matrix of one model version on a labeled folder."""

    key: str
    accuracy: float
    images: int
    labels: list[str]
    confusion: np.ndarray  # rows: true label, columns: predicted label

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"model": self.key, "accuracy": self.accuracy, "images": self.images,
                "labels": self.labels, "confusion": self.confusion.tolist()}  # fmt: skip

    def table(self) -> str:
        """The accuracy line and the confusion matrix as text."""
        width = max(5, *(len(label) + 1 for label in self.labels))
        head = "true\\pred".ljust(10) + "".join(label.rjust(width) for label in self.labels)
        rows = [
            label.ljust(10) + "".join(str(n).rjust(width) for n in row)
            for label, row in zip(self.labels, self.confusion, strict=True)
        ]
        correct = int(np.trace(self.confusion))
        summary = f"{self.key}: accuracy {self.accuracy * 100:.1f}% ({correct}/{self.images})"
        return "\n".join([summary, "", head, *rows])


def evaluate(info: ModelInfo, data_dir: Path, batch_size: int = 256) -> Evaluation:
    """Classify every image in ``data_dir/<label>/`` with the model, as a worker would."""
    data = load_folder(data_dir, info, labels=folder_labels(data_dir, info))
    model = load(info, batch_size)
    predicted = model.predict(data.x).argmax(axis=1)
    truth = np.asarray([info.labels.index(data.labels[i]) for i in data.y])
    n = len(info.labels)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    return Evaluation(info.key, float((predicted == truth).mean()), len(truth), info.labels,
                      confusion)  # fmt: skip


def folder_labels(data_dir: Path, info: ModelInfo) -> list[str]:
    """The ``<label>/`` folders of a labeled folder; ModelLoadError unless all are labels."""
    folders = sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir())
    unknown = [f for f in folders if f not in info.labels]
    if unknown or not folders:
        raise ModelLoadError(
            f"{data_dir}: expected <label>/ folders of {info.key}'s labels"
            + (f"; {unknown} are not" if unknown else "")
        )
    return folders


def measure_baseline(info: ModelInfo, data_dir: Path, batch_size: int = 256) -> dict[str, Any]:
    """What ``info`` looks like on the images under ``data_dir`` (any folder; labels unused):
    the counts a worker's monitoring keeps (producer.monitoring), measured the same way."""
    from producer.bulk import iter_inputs
    from producer.images import image_header
    from producer.monitoring import Profile, observe

    files = list(iter_inputs([str(data_dir)]))
    if not files:
        raise ModelLoadError(f"{data_dir}: no images found for a baseline")
    model = load(info, batch_size)
    profile = Profile()
    for start in range(0, len(files), batch_size):
        pixels, headers = [], []
        for file in files[start : start + batch_size]:
            data = Path(file).read_bytes()
            headers.append(image_header(data))
            pixels.append(preprocess.decode(data, info, 1 << 30, 1 << 30))
        stack = np.stack(pixels)
        probs = model.predict(preprocess.normalize(stack, info))
        best = probs.argmax(axis=1)
        labels = [info.labels[int(i)] for i in best]
        profile.counts.update(observe(stack, labels, probs.max(axis=1), headers))
    return {**profile.to_json(), "source": str(data_dir)}
