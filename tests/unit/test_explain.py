"""Explanations: asked for per job, computed in the batch, faithful to the model."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.registry import Registry
from producer.settings import Settings
from producer.wire import Job, jobs_to_kwargs, read_jobs
from tests.factories import Request, digit_paths, label_of
from worker.models import ModelCache
from worker.tasks import BatchRunner

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "mnist-cnn" / "1" / "model.keras"


def test_explained_jobs_carry_a_heatmap_and_the_others_nothing(models, fake_redis) -> None:
    runner = BatchRunner(Settings(), models, fake_redis)
    paths = digit_paths(4)
    jobs = [Job(f"j{i}", p.read_bytes(), explain=i % 2 == 0) for i, p in enumerate(paths)]
    results = runner.run([Request("m", jobs_to_kwargs(jobs))])
    for job, result, path in zip(jobs, results, paths, strict=True):
        shown = result.to_dict()
        assert shown["status"] == "SUCCESS" and shown["label"] == label_of(path)
        if not job.explain:
            assert "explanation" not in shown  # nothing computed, nothing added
            continue
        explanation = shown["explanation"]
        assert explanation["method"] == "integrated-gradients"
        assert explanation["target"] == shown["label"]
        assert (explanation["width"], explanation["height"]) == (28, 28)
        with Image.open(io.BytesIO(base64.b64decode(explanation["png"]))) as img:
            assert img.mode == "L" and img.size == (28, 28)
            heat = np.asarray(img)
        ink = np.asarray(Image.open(path)) > 0
        assert heat.max() == 255 and heat[~ink].max() == 0  # evidence only where there is ink


def test_explain_must_be_true_or_false() -> None:
    wire = {**Job("j", digit_paths(1)[0].read_bytes()).to_wire(), "explain": "yes"}
    _, [(job_id, reason)] = read_jobs({"jobs": [wire]})
    assert job_id == "j" and "explain must be true or false" in reason


def test_a_litert_version_says_it_explains_nothing(tmp_path, fake_redis) -> None:
    from worker.optimize import optimize

    registry = Registry(tmp_path / "models")
    registry.publish(SHIPPED, "mnist-cnn", [str(d) for d in range(10)], (28, 28, 1))
    fast = optimize(registry, registry.get("mnist-cnn"), "dynamic-int8")
    runner = BatchRunner(Settings(), ModelCache(registry, "mnist-cnn", 16), fake_redis)
    job = Job("j", digit_paths(1)[0].read_bytes(), version=fast.version, explain=True)
    [result] = runner.run([Request("m", jobs_to_kwargs([job]))])
    assert result.status == "SUCCESS" and result.explanation is not None
    assert "ask for version 1" in result.explanation["error"]


@pytest.fixture(scope="module")
def test_digits() -> tuple[np.ndarray, np.ndarray]:
    from worker.train import mnist_split

    _, _, x, y = mnist_split()  # the 1,000 test digits, never trained on
    return (x[..., None] / 255.0).astype(np.float32), y


def test_deleting_what_it_points_at_hurts_twice_as_much_as_deleting_random_ink(
    models: ModelCache, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    """The faithfulness test: delete (set to background) the 10% of pixels with the highest
    attribution, or as many randomly chosen ink pixels; the first must lower the predicted
    class's probability at least twice as much, on average over the 1,000 test digits."""
    model = models.get(None, None)
    x, _ = test_digits
    probs = model.predict(x)
    predicted = probs.argmax(axis=1)
    before = probs[np.arange(len(x)), predicted]
    assert model.explain is not None
    maps = np.concatenate([model.explain(x[i : i + 250], predicted[i : i + 250].astype(np.int32))
                           for i in range(0, len(x), 250)])  # fmt: skip
    flat, k = x.reshape(len(x), -1), int(0.1 * 28 * 28)
    top = np.argsort(-maps.reshape(len(x), -1), axis=1)[:, :k]
    by_attribution = flat.copy()
    np.put_along_axis(by_attribution, top, 0.0, axis=1)
    rng = np.random.default_rng(0)
    at_random = flat.copy()
    for i, row in enumerate(flat):
        ink = np.flatnonzero(row > 0)
        at_random[i, rng.choice(ink, size=min(k, len(ink)), replace=False)] = 0.0
    rows = np.arange(len(x))
    drop_attributed = before - model.predict(by_attribution.reshape(x.shape))[rows, predicted]
    drop_random = before - model.predict(at_random.reshape(x.shape))[rows, predicted]
    print(f"\ndeleting 10% of pixels: attribution order lowers p by {drop_attributed.mean():.3f},"
          f" random ink by {drop_random.mean():.3f}")  # fmt: skip
    assert drop_attributed.mean() >= 2 * drop_random.mean()


def test_the_deletion_curve_for_the_docs_drops_faster_in_attribution_order(
    models: ModelCache, test_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    from bench.explain import FRACTIONS, deletion_curves

    x, _ = test_digits
    attributed, random = deletion_curves(models.get(None, None), x[:200])
    assert len(attributed) == len(random) == len(FRACTIONS) and attributed[0] == random[0]
    ten = FRACTIONS.index(0.1)
    assert attributed[ten] < random[ten] and attributed[-1] <= attributed[1]
