"""Versions under a live worker: promote switches new jobs within 5 s, no job lost."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from batchery.local import RedisServer, WorkerProcess
from producer.client import Client
from producer.registry import Registry
from producer.settings import Settings
from tests.factories import digit_paths, wait_until_serving

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "mnist-cnn" / "1" / "model.keras"
LABELS = [str(d) for d in range(10)]


def shifted(path: Path) -> Path:
    """The shipped model with its output layer's weights rotated by one class: genuinely
    different weights, which answer ``(d + 1) % 10`` where version 1 answers ``d``."""
    from worker.models import tensorflow

    model = tensorflow().keras.models.load_model(SHIPPED, compile=False)
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([np.roll(kernel, 1, axis=1), np.roll(bias, 1)])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def live(redis_server: RedisServer, tmp_path_factory) -> Iterator[tuple[Client, Registry]]:
    """A worker on its own registry (mnist-cnn 1, and 2 with other weights) and its own queue."""
    root = tmp_path_factory.mktemp("registry")
    registry = Registry(root / "models")
    registry.publish(SHIPPED, "mnist-cnn", LABELS, (28, 28, 1))
    registry.publish(shifted(root / "shifted.keras"), "mnist-cnn", LABELS, (28, 28, 1))
    env = {"BATCHERY_MODEL_DIR": str(registry.root), "BATCHERY_QUEUE": "hot-update",
           "BATCHERY_MODEL_WATCH_S": "0.5"}  # fmt: skip
    settings = Settings(redis_url=redis_server.url, queue="hot-update", model_dir=registry.root)
    with WorkerProcess(redis_server.url, "--concurrency", "2", env=env) as worker:
        client = Client(settings=settings)
        wait_until_serving(client, worker)
        yield client, registry
        client.close()


def test_promote_switches_a_running_worker_within_5_s_without_losing_jobs(live) -> None:
    client, registry = live
    paths = digit_paths(10)
    submitted: list[tuple[float, str]] = []
    stop = threading.Event()

    def keep_submitting() -> None:
        i = 0
        while not stop.is_set():
            submitted.append((time.monotonic(), client.submit(paths[i % len(paths)])))
            i += 1
            time.sleep(0.02)

    thread = threading.Thread(target=keep_submitting)
    thread.start()
    time.sleep(2.0)
    before = [job for _, job in submitted]
    promoted_at = time.monotonic()
    registry.promote("mnist-cnn", "2")
    time.sleep(7.0)
    stop.set()
    thread.join()

    results = client.results([job for _, job in submitted], timeout=60)
    assert all(r["status"] == "SUCCESS" for r in results), "a job was lost or failed"
    by_id = {r["job_id"]: r for r in results}
    assert {by_id[job]["version"] for job in before[:-5]} == {"1"}
    late = [job for at, job in submitted if at > promoted_at + 5.0]
    assert late and {by_id[job]["version"] for job in late} == {"2"}
    # Version 2 has other weights: each digit gets version 1's answer, plus one.
    path_of = {job: paths[i % len(paths)] for i, (_, job) in enumerate(submitted)}
    answers: dict[str, dict[Path, set[str]]] = {"1": {}, "2": {}}
    for job, result in by_id.items():
        answers[result["version"]].setdefault(path_of[job], set()).add(result["label"])
    assert len(answers["2"]) == len(paths)
    for path, labels in answers["2"].items():
        [v1] = answers["1"][path]
        assert labels == {str((int(v1) + 1) % 10)}, (path.name, v1, labels)
    first_v2 = min(at for at, job in submitted if by_id[job]["version"] == "2")
    print(
        f"\njobs {len(submitted)}, lost 0, switched to v2 "
        f"{first_v2 - promoted_at:.2f} s after promote"
    )


def test_jobs_can_name_a_version_and_a_tampered_one_is_refused(live) -> None:
    client, registry = live
    info = registry.publish(SHIPPED, "mnist-cnn", LABELS, (28, 28, 1))
    shutil.copy(ROOT / "examples" / "digits" / "0_00.png", info.file)  # swap the weights file
    image = digit_paths(1)[0]
    ids = [client.submit(image, version="1"), client.submit(image, version=info.version)]
    ok, tampered = client.results(ids, timeout=60)
    assert ok["status"] == "SUCCESS" and ok["version"] == "1"
    assert tampered["status"] == "FAILURE" and "sha256" in tampered["error"]


@pytest.mark.usefixtures("live")
def test_an_unknown_model_fails_with_what_exists(redis_server) -> None:
    # A producer that cannot see the registry: the worker gives the same answer.
    blind = Client(
        settings=Settings(redis_url=redis_server.url, queue="hot-update", model_dir=Path("/nx"))
    )
    result = blind.result(blind.submit(digit_paths(1)[0], model="resnet"), timeout=30)
    assert result["status"] == "FAILURE"
    assert "unknown model 'resnet'" in result["error"] and "mnist-cnn" in result["error"]


def test_a_worker_serves_an_optimised_litert_version(live) -> None:
    from worker.optimize import optimize

    client, registry = live
    info = optimize(registry, registry.get("mnist-cnn", "1"), "dynamic-int8")
    paths = digit_paths(10)
    keras = client.results(client.submit_many(paths, version="1"), timeout=60)
    litert = client.results(client.submit_many(paths, version=info.version), timeout=60)
    assert [r["status"] for r in litert] == ["SUCCESS"] * 10
    assert {r["version"] for r in litert} == {info.version}  # the optimised version answers
    assert [r["label"] for r in litert] == [r["label"] for r in keras]
