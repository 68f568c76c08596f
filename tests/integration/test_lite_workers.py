"""A mixed fleet against a real Redis: a lite worker (no TensorFlow: every import of it is
blocked and recorded) and a TensorFlow worker. LiteRT jobs reach either, a Keras job only the
TensorFlow worker; with only lite workers up, a Keras job is refused before it is enqueued;
a Keras job that reaches a lite worker anyway is handed on, not failed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from batchery.local import RedisServer, WorkerProcess
from producer.client import Client
from producer.errors import NoWorkerError
from producer.registry import Registry
from producer.settings import Settings
from producer.wire import HEARTBEAT_PREFIX, Job, new_job_ids
from tests.factories import digit_paths, label_of

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
NO_TF = Path(__file__).resolve().parent / "no_tensorflow"
DIGITS = [p.read_bytes() for p in digit_paths(50)]
TRUTH = [label_of(p) for p in digit_paths(50)]


def kinds_alive(client: Client) -> list[str]:
    keys = list(client.redis.scan_iter(f"{HEARTBEAT_PREFIX}*"))
    return sorted(k.decode() for k in client.redis.mget(keys) if k) if keys else []


def wait_for(test: object, what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not test():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
        time.sleep(0.2)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_a_mixed_fleet_sends_each_job_to_a_worker_that_can_serve_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    attempts = tmp_path / "tensorflow-imports"
    lite_env = {"PYTHONPATH": f"{NO_TF}:{ROOT}", "BATCHERY_WORKER_KIND": "lite",
                "BATCHERY_TEST_TF_ATTEMPTS": str(attempts),
                "BATCHERY_MODEL_WATCH_S": "0.2"}  # fmt: skip
    settings = Settings(redis_url=redis_server.url)
    with WorkerProcess(redis_server.url, "--concurrency", "1", env=lite_env) as lite, \
            Client(settings=settings) as client:  # fmt: skip
        wait_for(lambda: kinds_alive(client) == ["lite"], "lite worker")
        # Only lite workers are up: a job for the promoted Keras version is refused, at once.
        with pytest.raises(NoWorkerError, match="every worker up is a lite one"):
            client.submit_many(DIGITS[:1])
        # LiteRT jobs are served by the lite worker.
        results = client.results(client.submit_many(DIGITS, version="3"), timeout=60)
        assert [r["status"] for r in results] == ["SUCCESS"] * 50
        assert {r["version"] for r in results} == {"3"}
        assert sum(r["label"] == t for r, t in zip(results, TRUTH, strict=True)) >= 47
        # A Keras job in the lite lane (as if its lane was chosen before a promotion): the
        # lite worker hands it on to the main lane instead of failing it.
        [stray] = new_job_ids(1)
        client.enqueue([Job(stray, DIGITS[0], version="2", lane="lite")])
        wait_for(lambda: "handed 1 jobs to TensorFlow workers" in lite.log_path.read_text(),
                 "hand-over", 30)  # fmt: skip
        assert client.result(stray)["status"] == "PENDING"

        with WorkerProcess(redis_server.url, "--concurrency", "1") as full:
            wait_for(lambda: kinds_alive(client) == ["full", "lite"], "TensorFlow worker")
            assert client.result(stray, timeout=60)["version"] == "2"
            keras = client.submit_many(DIGITS)
            lite_jobs = client.submit_many(DIGITS * 4, version="3")
            done = client.results(keras + lite_jobs, timeout=120)
            assert all(r["status"] == "SUCCESS" for r in done)
            assert {r["version"] for r in done[:50]} == {"2"}
            full_log = full.log_path.read_text()
        lite_log = lite.log_path.read_text()
    # No Keras job ever ran on the lite worker; TensorFlow was never imported there.
    assert not re.search(r"batch of \d+ jobs \(mnist-cnn@2", lite_log), lite_log[-2000:]
    assert "mnist-cnn@2" in full_log
    assert not attempts.exists() or attempts.read_text() == "", attempts.read_text()


def test_both_kinds_give_identical_outputs_for_the_same_litert_version(tmp_path: Path) -> None:
    """The same LiteRT version through the TensorFlow worker's process (TensorFlow loaded)
    and through a process that cannot import TensorFlow: the same probabilities, bit for bit."""
    script = (
        "import sys, numpy as np; from pathlib import Path\n"
        "from producer.registry import Registry; from worker import preprocess\n"
        "from worker.models import load\n"
        "info = Registry(Path('models')).get('mnist-cnn', '3')\n"
        "paths = sorted(Path('examples/digits').glob('*.png'))\n"
        "x = np.stack([preprocess.decode(p.read_bytes(), info, 1 << 20, 1 << 20) for p in paths])\n"
        "np.save(sys.argv[1], load(info, 64).predict(preprocess.normalize(x, info)))\n"
    )  # fmt: skip
    outputs = {}
    for kind, env in (("full", {"PYTHONPATH": str(ROOT)}),
                      ("lite", {"PYTHONPATH": f"{NO_TF}:{ROOT}"})):  # fmt: skip
        out = tmp_path / f"{kind}.npy"
        prelude = "import tensorflow\n" if kind == "full" else ""
        done = subprocess.run([sys.executable, "-c", prelude + script, str(out)], cwd=ROOT,
                              env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[kind] = np.load(out)
    assert outputs["full"].shape == (100, 10)
    assert np.array_equal(outputs["full"], outputs["lite"])
    info = Registry(ROOT / "models").get("mnist-cnn", "3")
    assert info.format == "litert"


def test_a_lite_worker_refuses_a_keras_version_it_is_pinned_to_with_a_clear_reason(
    tmp_path: Path,
) -> None:
    shutil.copytree(ROOT / "models", tmp_path / "models")
    script = ("from pathlib import Path\nfrom producer.registry import Registry\n"
              "from worker.models import load\n"
              "load(Registry(Path('models')).get('mnist-cnn', '2'), 16)\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          env={**os.environ, "PYTHONPATH": f"{NO_TF}:{ROOT}"}, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode != 0
    assert (
        "this worker has no TensorFlow (a lite worker serves LiteRT versions only)" in done.stderr
    )
