"""`batchery models optimize`: LiteRT versions, converted, measured, served, promoted with care."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from batchery.cli import main
from producer.errors import PromotionRefusedError
from producer.registry import Registry
from tests.factories import DIGITS, label_of
from worker import preprocess
from worker.models import load
from worker.optimize import optimize

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "mnist-cnn" / "1" / "model.keras"
LABELS = [str(d) for d in range(10)]


@pytest.fixture(scope="module")
def labeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 100 example digits in <label>/ folders."""
    root = tmp_path_factory.mktemp("labeled")
    for path in sorted(DIGITS.glob("*.png")):
        (root / label_of(path)).mkdir(exist_ok=True)
        shutil.copy(path, root / label_of(path) / path.name)
    return root


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "models")
    registry.publish(SHIPPED, "mnist-cnn", LABELS, (28, 28, 1))
    return registry


def digits_batch(info) -> tuple[np.ndarray, list[str]]:  # type: ignore[no-untyped-def]
    paths = sorted(DIGITS.glob("*.png"))
    x = np.stack([preprocess.decode(p.read_bytes(), info, 1 << 20, 1 << 20) for p in paths])
    return preprocess.normalize(x, info), [label_of(p) for p in paths]


@pytest.mark.parametrize("method", ["float16", "dynamic-int8", "int8"])
def test_a_version_optimised_publishes_measured_and_serves_batched(
    registry: Registry, labeled: Path, method: str
) -> None:
    source = registry.get("mnist-cnn")
    info = optimize(registry, source, method, calibration_dir=labeled, test_dir=labeled)
    assert info.version == "2" and registry.promoted("mnist-cnn") == "1"  # not promoted
    record = info.meta["optimized"]
    assert info.format == "litert" and record["source_version"] == "1"
    assert record["method"] == method and record["test_images"] == 100
    assert record["agreement"] >= 0.95 and record["accuracy"] >= record["source_accuracy"] - 0.02
    if method != "float16":
        assert record["bytes"] * 3.5 <= record["source_bytes"]  # int8 weights: a quarter
    # Served like any version: sha256 checked, batched, the same preprocessing.
    served = load(registry.get("mnist-cnn", "2"), batch_size=16)
    x, truth = digits_batch(info)
    probs = served.predict(x)  # 100 inputs through a 16-row interpreter: 7 passes, padded
    # Scores of an int8 model come in steps of 1/256: they sum to 1 within two steps.
    assert probs.shape == (100, 10) and np.allclose(probs.sum(axis=1), 1.0, atol=2 / 256)
    keras = load(source, batch_size=16).predict(x).argmax(axis=1)
    assert (probs.argmax(axis=1) == keras).mean() >= 0.95
    assert (np.array(LABELS)[probs.argmax(axis=1)] == np.array(truth)).mean() >= 0.9


def test_promote_refuses_a_version_too_far_below_its_source(registry: Registry) -> None:
    source = registry.get("mnist-cnn")
    info = optimize(registry, source, "dynamic-int8")
    meta_file = info.path / "model.json"
    meta = json.loads(meta_file.read_text())
    meta["optimized"].update(accuracy=0.95, source_accuracy=0.97, test_dir="digits")
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(PromotionRefusedError, match=r"95\.0%.*source version 1 97\.0%"):
        registry.promote("mnist-cnn", info.version)
    assert registry.promoted("mnist-cnn") == "1"
    registry.promote("mnist-cnn", info.version, force=True)
    assert registry.promoted("mnist-cnn") == info.version


def test_the_cli_optimizes_and_says_what_it_measured(registry, labeled, capsys, monkeypatch):
    monkeypatch.setenv("BATCHERY_MODEL_DIR", str(registry.root))
    code = main(["models", "optimize", "mnist-cnn@1", "--to", "int8", "--calibration-dir",
                 str(labeled), "--test-dir", str(labeled)])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["published"] == "mnist-cnn@2" and out["method"] == "int8"
    assert {"accuracy", "source_accuracy", "agreement", "bytes"} <= set(out)
    code = main(["models", "optimize", "mnist-cnn", "--to", "int8"])
    assert code == 1 and "--calibration-dir" in capsys.readouterr().err
