"""Monitoring against a real worker and Redis: a baseline recorded by the CLI, live windows
written by the worker's batches, drift flagged on a shifted stream and not on a fresh sample
of the baseline's own distribution."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.drift import halves, png
from producer.client import Client
from producer.registry import BASELINE_FILE
from producer.wire import MONITOR_KEY_PREFIX
from tests.factories import batchery_cli, worker_on_own_registry

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, dict[str, str]]]:
    with worker_on_own_registry(tmp_path_factory.mktemp("monitoring")) as found:
        yield found


batchery = batchery_cli


def forget_windows(client: Client) -> None:
    keys = list(client.redis.scan_iter(f"{MONITOR_KEY_PREFIX}mnist-cnn@*"))
    if keys:
        client.redis.delete(*keys)


def monitor(env: dict[str, str]) -> dict[str, dict]:  # type: ignore[type-arg]
    done = batchery(env, "monitor", "mnist-cnn", "--json")
    assert done.returncode == 0, done.stderr
    return {row["version"]: row for row in json.loads(done.stdout)}


def test_drift_is_flagged_on_a_shifted_stream_and_not_on_a_fresh_sample(
    stack: tuple[Client, dict[str, str]], tmp_path: Path
) -> None:
    client, env = stack
    base_half, stream_half = halves()
    folder = tmp_path / "baseline"
    for i, (pixels, label) in enumerate(zip(base_half, np.repeat(range(10), 50), strict=False)):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / str(label) / f"{i}.png")
    recorded = batchery(env, "models", "evaluate", "mnist-cnn@2", str(folder), "--record-baseline")
    assert recorded.returncode == 0, recorded.stderr
    assert (
        "accuracy" in recorded.stdout and "baseline of mnist-cnn@2: 500 images" in recorded.stderr
    )
    assert (Path(env["BATCHERY_MODEL_DIR"]) / "mnist-cnn" / "2" / BASELINE_FILE).is_file()

    # Nothing served yet: the promoted version is listed, with too few jobs to judge.
    forget_windows(client)
    row = monitor(env)["2"]
    assert row["jobs"] == 0 and not row["drifted"]
    assert row["baseline"]["source"].startswith("manifest") and row["baseline"]["jobs"] == 500

    # A fresh sample of the same distribution: counted, compared, not flagged.
    ids = client.submit_many([png(p) for p in stream_half])
    assert all(r["status"] == "SUCCESS" for r in client.results(ids, timeout=120))
    row = monitor(env)["2"]
    assert row["jobs"] == 500 and row["enough_jobs"] and not row["drifted"], row["drift"]
    assert {d["distribution"] for d in row["drift"]} >= {
        "class mix",
        "top-1 score",
        "pixel mean",
        "pixel spread",
    }
    assert sum(row["class_mix"].values()) == pytest.approx(1.0)
    assert 0 <= row["low_confidence"] < 0.1

    # The same digits inverted (another scanner): flagged within 300 jobs.
    forget_windows(client)
    inverted = [png(255 - p) for p in stream_half[:300]]
    assert all(r["status"] == "SUCCESS" for r in client.results(client.submit_many(inverted),
                                                                timeout=120))  # fmt: skip
    row = monitor(env)["2"]
    assert row["jobs"] == 300 and row["drifted"]
    flagged = {d["distribution"] for d in row["drift"] if d["flagged"]}
    assert "pixel mean" in flagged, row["drift"]
    text = batchery(env, "monitor").stdout
    assert "mnist-cnn@2 (promoted): 300 jobs" in text and "DRIFT" in text


def test_a_version_without_a_recorded_baseline_takes_its_first_live_window(
    stack: tuple[Client, dict[str, str]],
) -> None:
    client, env = stack
    _, stream_half = halves()
    forget_windows(client)
    assert "1" not in monitor(env)  # version 1 served nothing: not listed
    ids = client.submit_many([png(p) for p in stream_half[:200]], version="1")
    client.results(ids, timeout=120)
    row = monitor(env)["1"]
    assert row["jobs"] == 200 and row["baseline"]["source"].startswith("none yet")
    ids = client.submit_many([png(p) for p in stream_half[200:]] * 3, version="1")
    client.results(ids, timeout=120)
    row = monitor(env)["1"]
    assert row["baseline"]["source"] == "first live window" and row["baseline"]["jobs"] >= 1000
    assert not row["drifted"]
