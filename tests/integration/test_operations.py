"""Operations: Prometheus metrics, JSON logs, Flower, `status --watch` and `--here`.

One worker for the module, set up as the compose file runs it: metrics on a port, JSON logs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batchery.local import RedisServer, WorkerProcess, free_port
from gateway.quality import EXPORTED as QUALITY
from producer.client import Client
from producer.registry import Registry
from tests.factories import corrupt_png, digit_paths, wait_for, wait_until_serving
from worker.metrics import EXPORTED

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "batchery.json"


class OpsWorker:
    def __init__(self, url: str) -> None:
        self.url = url
        self.metrics_port = free_port()
        env = {"BATCHERY_METRICS_PORT": str(self.metrics_port), "BATCHERY_LOG_FORMAT": "json"}
        self.process = WorkerProcess(url, "--concurrency", "2", env=env)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample on the metrics port, keyed by (name, sorted labels)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


@pytest.fixture(scope="module")
def ops() -> Iterator[OpsWorker]:
    """Its own Redis, so its counts and the workers Flower sees are its own."""
    with RedisServer() as server:
        worker = OpsWorker(server.url)
        with worker.process:
            with Client(server.url) as client:
                wait_until_serving(client, worker.process)
            # Both pool processes warmed up: each counts its model load once.
            deadline = time.monotonic() + 180
            while total(worker.scrape(), "batchery_model_loads_total") < 2:
                worker.process.check_alive()
                assert time.monotonic() < deadline, "the second pool process never loaded"
                time.sleep(0.2)
            yield worker


def total(samples: dict, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


COUNTED_PER_JOB = ("batchery_jobs_total", "batchery_queue_wait_seconds_count",
                   "batchery_end_to_end_seconds_count")  # fmt: skip


def test_metrics_add_up_to_the_jobs_sent(ops: OpsWorker) -> None:
    before = ops.scrape()
    with Client(ops.url) as client:
        images: list[object] = list(digit_paths(60))
        images[7] = corrupt_png(digit_paths(1)[0])
        results = client.results(client.submit_many(images), timeout=60)
    assert sum(r["status"] == "SUCCESS" for r in results) == 59
    # Counted just after the results are stored: wait for the last batch's count.
    deadline = time.monotonic() + 10
    while True:
        after = ops.scrape()
        delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
        # The last batch's queue-wait and end-to-end observations follow its job counts.
        counted = [total(delta, name) for name in COUNTED_PER_JOB]
        if min(counted) >= 60 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    labels = {"model": "mnist-cnn", "version": Registry(ROOT / "models").promoted("mnist-cnn")}
    assert total(delta, "batchery_jobs_total", status="SUCCESS", **labels) == 59
    assert total(delta, "batchery_jobs_total", status="FAILURE", **labels) == 1
    # Every image that decoded went through exactly one forward pass, timed once.
    assert total(delta, "batchery_batch_size_sum") == 59
    passes = total(delta, "batchery_batch_size_count")
    assert 1 <= passes <= 59 and total(delta, "batchery_inference_seconds_count") == passes
    assert total(delta, "batchery_queue_wait_seconds_count") == 60
    assert total(delta, "batchery_end_to_end_seconds_count") == 60
    assert total(after, "batchery_model_loads_total", **labels) == 2  # one per pool process
    assert total(after, "batchery_queue_depth") == 0 and ("batchery_in_flight", ()) in after
    assert after[("batchery_backlog_jobs", (("queue", "batchery"),))] == 0  # all answered
    print(f"\nmetrics: 60 jobs in {passes:.0f} forward passes, "
          f"{total(delta, 'batchery_end_to_end_seconds_sum') / 60 * 1000:.1f} ms mean "
          "end to end")  # fmt: skip


def test_the_backlog_counts_every_job_not_answered_where_queue_depth_cannot(
    ops: OpsWorker,
) -> None:
    """``batchery_backlog_jobs`` is the jobs not answered yet, wherever they are: read between
    two counts of unanswered jobs, it lies between them, while the queue shows far fewer."""
    backlog = ("batchery_backlog_jobs", (("queue", "batchery"),))
    with Client(ops.url) as client:
        ids = client.submit_many(digit_paths() * 2)  # 1,000 jobs in messages of 256
        samples, fewer = 0, False
        while True:
            before = sum(r["status"] == "PENDING" for r in client.results(ids))
            scraped = ops.scrape()
            after = sum(r["status"] == "PENDING" for r in client.results(ids))
            assert after <= scraped[backlog] <= before
            queued_jobs = 256 * scraped[("batchery_queue_depth", ())]
            fewer = fewer or queued_jobs < after  # messages buffered or running
            samples += 1
            if not after:
                break
        assert fewer, "the queue never showed fewer jobs than were waiting"
    print(f"\nbacklog: {samples} samples, each between the unanswered counts around it")


def test_the_dashboard_queries_only_metrics_the_worker_exports(ops: OpsWorker) -> None:
    """Those of a worker, and the model quality figures of a gateway (gateway/quality.py,
    tested in tests/unit/test_quality_metrics.py)."""
    live = {name for name, _ in ops.scrape()}
    exported = {re.sub(r"_(bucket|sum|count)$", "", name) for name in live}
    assert set(EXPORTED) <= exported | live
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {m for q in queries for m in re.findall(r"\bbatchery_[a-z_0-9]+", q)}
    assert named, "the dashboard queries no batchery metric"
    from_workers = named - set(QUALITY)
    assert from_workers <= live, f"the dashboard names metrics none exports: {from_workers - live}"
    for wanted in ("batchery_jobs_total", "batchery_batch_size_sum", "batchery_queue_depth",
                   "batchery_end_to_end_seconds_bucket", "batchery_top1_score_bucket",
                   "batchery_model_drift", "batchery_model_low_confidence_ratio",
                   "batchery_model_live_accuracy"):  # fmt: skip
        assert wanted in named  # throughput, batch size, queue depth, latency, quality


def test_logs_are_one_json_object_a_line_with_job_ids(ops: OpsWorker) -> None:
    with Client(ops.url) as client:
        ids = client.submit_many(digit_paths(5))
        client.results(ids, timeout=30)
    time.sleep(0.5)
    log = ops.process.log_path.read_text()
    assert not re.search(r"^\[\d{4}-\d\d-\d\d [^\]]*: (INFO|WARNING|ERROR)/", log, re.M)
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    batches = [r for r in records if set(ids) & set(r.get("job_ids", []))]
    assert batches, "no batch line names the jobs"
    assert sum(len(set(ids) & set(r["job_ids"])) for r in batches) == 5
    for record in batches:
        promoted = Registry(ROOT / "models").promoted("mnist-cnn")
        assert record["models"] == [f"mnist-cnn@{promoted}"]
        assert record["batch_size"] == len(record["job_ids"])
        assert {"time", "level", "process", "logger", "message"} <= set(record)
    images = [base64.b64encode(p.read_bytes()).decode()[40:100] for p in digit_paths(5)]
    assert not any(image in log for image in images)


def run_cli(url: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchery.cli", *args],
        env={**os.environ, "BATCHERY_REDIS_URL": url}, cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def test_status_watch_shows_live_rates_until_interrupted(ops: OpsWorker) -> None:
    watch = run_cli(ops.url, "status", "--watch", "0.3", "--json")
    frames: list[dict[str, Any]] = []

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            frames.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: bool(frames), watch, 60, "first reading")  # before the jobs
        with Client(ops.url) as client:
            client.results(client.submit_many(digit_paths(100)), timeout=30)
        wait_for(lambda: len(frames) >= 5 and frames[-1]["done"] >= frames[0]["done"] + 100,
                 watch, 30, "100 jobs over five readings")  # fmt: skip
    finally:
        watch.send_signal(signal.SIGINT)
        try:
            watch.wait(timeout=30)
        except subprocess.TimeoutExpired:
            watch.kill()
            raise
        reader.join(timeout=10)
    assert watch.stderr is not None
    assert watch.returncode == 0, watch.stderr.read()
    assert len(frames) >= 5
    assert max(f["jobs_per_s"] for f in frames) > 0
    assert frames[-1]["done"] >= frames[0]["done"] + 100


def test_status_watch_stops_on_the_first_ctrl_c_wherever_it_lands(ops: OpsWorker) -> None:
    """Ctrl-C at many moments: while Python starts, while it connects, mid-reading, asleep."""
    for delay in (0.05, 0.3, 0.6, 0.9, 1.2, 1.31, 1.45, 1.6, 2.0, 2.5):
        watch = run_cli(ops.url, "status", "--watch", "0.05", "--json")
        time.sleep(delay)
        watch.send_signal(signal.SIGINT)
        try:
            watch.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            watch.kill()
            pytest.fail(f"status --watch went on after a Ctrl-C {delay} s after its start")
        # 0: stopped by its own handler; 130 or -SIGINT: interrupted before it was set up.
        assert watch.returncode in (0, 130, -signal.SIGINT), (delay, watch.returncode)


def test_status_here_is_the_containers_healthcheck(ops: OpsWorker) -> None:
    healthy = run_cli(ops.url, "status", "--here")
    assert healthy.wait(timeout=60) == 0
    with RedisServer() as empty:  # a Redis no worker serves
        unhealthy = run_cli(empty.url, "status", "--here")
        assert unhealthy.wait(timeout=60) == 1


def flower_get(port: int, path: str, auth: str | None) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def test_flower_sees_our_worker_and_task(ops: OpsWorker) -> None:
    port, auth = free_port(), "ops:flower-test-pw"
    # The broker URL from the environment, as compose gives it: `ps` shows no password.
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "flower", f"--port={port}", "--address=127.0.0.1",
         f"--basic-auth={auth}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
        env={**os.environ, "CELERY_BROKER_URL": ops.url},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        workers: dict = {}

        def registered() -> list[str]:
            ours = [w for name, w in workers.items() if name.startswith("batchery-")]
            return [task for w in ours for task in w.get("registered", [])]

        # Flower asks the workers (Celery's remote control) and lists their registered tasks.
        while "batchery.classify" not in registered():
            assert time.monotonic() < deadline, f"flower found no batchery worker: {workers}"
            time.sleep(0.5)
            try:
                workers = flower_get(port, "/api/workers?refresh=1", auth)  # type: ignore[assignment]
            except (urllib.error.URLError, ConnectionError):
                continue
        assert len([name for name in workers if name.startswith("batchery-")]) == 1
        with pytest.raises(urllib.error.HTTPError) as refused:
            flower_get(port, "/api/workers", None)
        assert refused.value.code == 401
        # Task events: flower follows our messages by name through STARTED to SUCCESS.
        with Client(ops.url) as client:
            client.results(client.submit_many(digit_paths(3)), timeout=30)
        tasks: dict = {}
        while not any(
            t.get("name") == "batchery.classify"
            and t.get("state") == "SUCCESS"
            and t.get("received")
            and t.get("started")
            and t.get("succeeded")
            for t in tasks.values()
        ):
            assert time.monotonic() < deadline + 30, f"flower saw no task through STARTED: {tasks}"
            time.sleep(0.5)
            tasks = flower_get(port, "/api/tasks", auth)  # type: ignore[assignment]
        assert "not sent" not in ops.process.log_path.read_text()
    finally:
        flower.terminate()
        flower.wait(timeout=30)
