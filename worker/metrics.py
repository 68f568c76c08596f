"""Prometheus metrics from every worker, correct under Celery's prefork pool.

Jobs are answered in pool processes, but Prometheus scrapes one port per worker. With
``BATCHERY_METRICS_PORT`` set, the worker's main process gives every process one directory
to write its samples to (prometheus-client's multiprocess mode, chosen before the pool
forks), and serves their sum on that port, together with the queue depth read from Redis at
scrape time. Without it, nothing is recorded or served.

Metric names (the Grafana dashboard in deploy/ uses exactly these; a test checks it):
``batchery_jobs_total{model,version,status,priority}``, ``batchery_batch_size`` (images in one
forward pass), ``batchery_inference_seconds`` (one forward pass),
``batchery_queue_wait_seconds`` (submit to the start of the job's batch),
``batchery_end_to_end_seconds`` (submit to result stored),
``batchery_model_loads_total{model,version}``, ``batchery_top1_score{model,version}`` (each
answered job's top-1 score, bucketed at producer.monitoring.SCORE_EDGES; the drift figures
are the gateway's, gateway/quality.py), ``batchery_queue_depth`` and
``batchery_in_flight`` (messages waiting, and taken but not yet acknowledged), and
``batchery_backlog_jobs{queue}``: jobs pushed and not answered yet across the deployment
(waiting, buffered in workers, running), the signal to scale workers on (deploy/k8s).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from producer.monitoring import SCORE_EDGES
from producer.registry import ModelInfo
from producer.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Every metric a worker exports, by the name Prometheus shows (a Counter gains _total).
EXPORTED = (
    "batchery_jobs_total",
    "batchery_batch_size",
    "batchery_inference_seconds",
    "batchery_queue_wait_seconds",
    "batchery_end_to_end_seconds",
    "batchery_model_loads_total",
    "batchery_top1_score",
    "batchery_queue_depth",
    "batchery_in_flight",
    "batchery_backlog_jobs",
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                    60, 300)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Upper bounds of the top-1 score buckets: monitoring's bin edges (finer near 1), then +Inf.
_SCORE_BUCKETS = SCORE_EDGES[1:]


class Metrics:
    """The metrics a pool process records. Build one per process with :func:`for_settings`."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.jobs = Counter(
            "batchery_jobs", "Jobs answered", ["model", "version", "status", "priority"]
        )  # fmt: skip
        self.batch_size = Histogram(
            "batchery_batch_size", "Images in one forward pass", buckets=_BATCH_BUCKETS
        )
        self.inference = Histogram(
            "batchery_inference_seconds", "Time of one forward pass", buckets=_LATENCY_BUCKETS
        )
        self.queue_wait = Histogram(
            "batchery_queue_wait_seconds",
            "From submit to the start of the job's batch",
            buckets=_LATENCY_BUCKETS,
        )
        self.end_to_end = Histogram(
            "batchery_end_to_end_seconds",
            "From submit to the job's result stored",
            buckets=_LATENCY_BUCKETS,
        )
        self.model_loads = Counter("batchery_model_loads", "Models loaded", ["model", "version"])
        self.top1_score = Histogram(
            "batchery_top1_score",
            "Top-1 score of each job answered",
            ["model", "version"],
            buckets=_SCORE_BUCKETS,
        )

    def forward_pass(self, images: int, seconds: float) -> None:
        """Record one forward pass."""
        self.batch_size.observe(images)
        self.inference.observe(seconds)

    def model_loaded(self, info: ModelInfo) -> None:
        """Record a model version loaded."""
        self.model_loads.labels(info.name, info.version).inc()


_metrics: Metrics | None = None
#: This worker's samples directory, set by prepare() in the main process (forks inherit it).
_directory: str | None = None


def for_settings(settings: Settings) -> Metrics | None:
    """This process's metrics, or None when the worker exports none."""
    global _metrics
    if settings.metrics_port is None or _directory is None:
        return None
    if _metrics is None:
        _metrics = Metrics()
    return _metrics


def prepare(settings: Settings) -> None:
    """In the worker's main process, before prometheus-client is imported and the pool forks:
    a fresh directory every process of this worker writes its samples to."""
    global _directory
    if settings.metrics_port is None:
        return
    _directory = tempfile.mkdtemp(prefix="batchery-metrics-")
    # Not configuration: how prometheus_client, here and in every forked pool process, finds
    # the directory (it reads the variable when first imported).
    os.environ.update({MULTIPROC_ENV: _directory})
    from prometheus_client import values

    if values.ValueClass.__name__ == "MutexValue":  # imported before the directory was set
        raise RuntimeError("prometheus_client was imported before metrics were prepared")


def serve(settings: Settings, read_queue: Callable[[], tuple[int, int, int]]) -> None:
    """Serve the sum of every process's samples, and the queue, on BATCHERY_METRICS_PORT."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector

    class QueueCollector:
        """Queue depth, messages in flight and the backlog, read from Redis at scrape time."""

        def collect(self) -> Iterator[Any]:
            try:
                depth, in_flight, backlog = read_queue()
            except Exception as exc:  # a scrape must not fail because Redis is away
                log.warning("queue depth not read for metrics: %s", exc)
                return
            yield GaugeMetricFamily("batchery_queue_depth", "Messages waiting", value=depth)
            yield GaugeMetricFamily(
                "batchery_in_flight", "Messages taken, not yet acknowledged", value=in_flight
            )
            yield backlog_gauge(settings.queue, backlog)

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(QueueCollector())
    assert settings.metrics_port is not None
    start_http_server(settings.metrics_port, registry=registry)
    log.info("metrics on :%d/metrics", settings.metrics_port)


def backlog_gauge(queue: str, jobs: int) -> Any:
    """``batchery_backlog_jobs{queue}``, as workers and gateways export it."""
    from prometheus_client.core import GaugeMetricFamily

    gauge = GaugeMetricFamily(
        "batchery_backlog_jobs",
        "Jobs pushed and not answered yet: waiting, buffered in workers, running",
        labels=["queue"],
    )
    gauge.add_metric([queue], jobs)
    return gauge


def clean_up() -> None:
    """Remove this worker's samples directory (at shutdown)."""
    if _directory is not None:
        shutil.rmtree(_directory, ignore_errors=True)
