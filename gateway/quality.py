"""Model quality for Prometheus: the gateway exports each model version's drift figures.

Monitoring's read side (producer.monitoring) run in the gateway: every :data:`REFRESH_S`
seconds a background task reads, in a worker thread (the reads are synchronous Redis and
registry reads), each version's live window, its baseline and its feedback, as ``batchery
monitor`` does, and keeps the figures; a scrape of ``/metrics`` only reports the last ones, so
scrapes cost nothing and never wait on Redis. A read that fails drops the figures (no stale
figure) until one succeeds.

Gauges, labelled ``model`` and ``version`` (only versions the registry holds: each that
answered jobs in the look-back, and each promoted one):

- ``batchery_model_drift{distribution}``: the Jensen-Shannon distance (0 same, 1 disjoint) of
  the live window from the baseline, per distribution (class mix, top-1 score, pixel mean,
  pixel spread, input size, input format); none until the version has a baseline.
- ``batchery_model_drift_threshold``: the distance over which a distribution is flagged
  (BATCHERY_DRIFT_THRESHOLD).
- ``batchery_model_drifted``: 1 when a distribution is flagged and the window holds enough
  jobs (``producer.monitoring.MIN_JOBS``, as ``batchery monitor`` flags it), else 0.
- ``batchery_model_window_jobs``: jobs in the live window (newest minutes summed up to
  BATCHERY_MONITOR_WINDOW_JOBS).
- ``batchery_model_low_confidence_ratio``: the window's share of jobs whose top-1 score is
  under BATCHERY_LOW_CONFIDENCE (NaN without jobs).
- ``batchery_model_live_accuracy``: right / jobs with feedback (NaN without feedback);
  ``batchery_model_feedback_jobs``: those jobs.

Every gateway exports the same figures: aggregate them with ``max``, not ``sum``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from producer.monitoring import Drift, reports
from producer.registry import Registry
from producer.settings import Settings
from producer.wire import STATS_KEY

log = logging.getLogger("batchery.gateway")

#: Seconds between two reads of the figures.
REFRESH_S = 30.0

#: Every metric this module exports.
EXPORTED = (
    "batchery_model_drift",
    "batchery_model_drift_threshold",
    "batchery_model_drifted",
    "batchery_model_window_jobs",
    "batchery_model_low_confidence_ratio",
    "batchery_model_live_accuracy",
    "batchery_model_feedback_jobs",
    "batchery_canary_decisions_total",
)


@dataclass(frozen=True)
class VersionQuality:
    """One version's figures, as the gauges report them."""

    model: str
    version: str
    window_jobs: int
    low_confidence: float | None
    drifts: tuple[Drift, ...]
    threshold: float
    drifted: bool
    feedback_jobs: int
    accuracy: float | None


def read(client: redis.Redis, registry: Registry, settings: Settings) -> list[VersionQuality]:
    """Each version's figures (synchronous: Redis and the registry), from the reports
    ``batchery monitor`` shows (producer.monitoring.reports: a version that cannot be read is
    left out, and said so in the log)."""
    return [
        VersionQuality(
            model=found.model,
            version=found.version,
            window_jobs=found.live.jobs,
            low_confidence=found.low_confidence,
            drifts=found.drifts,
            threshold=found.threshold,
            drifted=found.drifted,
            feedback_jobs=found.accuracy.jobs,
            accuracy=found.accuracy.rate,
        )
        for found in reports(client, registry, settings)
    ]


def read_decisions(client: redis.Redis) -> dict[str, int]:
    """Canary decisions counted so far (the stats hash's ``canary_*`` counters)."""
    promoted, rolled_back = client.hmget(STATS_KEY, "canary_promoted", "canary_rolled_back")
    return {"promoted": int(promoted or 0), "rolled_back": int(rolled_back or 0)}


class QualityGauges:
    """A Prometheus collector of the last figures read (:attr:`rows`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.rows: list[VersionQuality] = []
        #: Canary decisions so far (``batchery models canary --watch``): promoted, rolled back.
        self.decisions: dict[str, int] = {}
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[Any]:
        labels = ["model", "version"]

        def gauge(name: str, text: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=[*labels, *extra])

        distance = gauge(
            "batchery_model_drift",
            "Jensen-Shannon distance of the live window from the baseline (0 same, 1 disjoint)",
            ("distribution",),
        )
        threshold = gauge(
            "batchery_model_drift_threshold", "Distance over which a distribution is flagged"
        )
        drifted = gauge(
            "batchery_model_drifted", "1 when a distribution is flagged in a window of enough jobs"
        )
        jobs = gauge("batchery_model_window_jobs", "Jobs in the live window")
        low = gauge(
            "batchery_model_low_confidence_ratio",
            "Share of the window's jobs under the low-confidence top-1 score",
        )
        accuracy = gauge("batchery_model_live_accuracy", "Right / jobs with feedback")
        feedback = gauge("batchery_model_feedback_jobs", "Jobs with feedback")
        decisions = CounterMetricFamily(
            "batchery_canary_decisions", "Canaries promoted or rolled back by their guardrails",
            labels=["decision"],
        )  # fmt: skip
        for decision, count in self.decisions.items():
            decisions.add_metric([decision], count)
        yield decisions
        for row in self.rows:
            key = [row.model, row.version]
            for d in row.drifts:
                distance.add_metric([*key, d.name], d.distance)
            threshold.add_metric(key, row.threshold)
            drifted.add_metric(key, float(row.drifted))
            jobs.add_metric(key, row.window_jobs)
            low.add_metric(key, _or_nan(row.low_confidence))
            accuracy.add_metric(key, _or_nan(row.accuracy))
            feedback.add_metric(key, row.feedback_jobs)
        yield from (distance, threshold, drifted, jobs, low, accuracy, feedback)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


async def refresh(
    gauges: QualityGauges,
    read_rows: Callable[[], list[VersionQuality]],
    stop: asyncio.Event,
    every: float = REFRESH_S,
) -> None:
    """Until ``stop`` is set: ``read_rows`` in a worker thread, its rows to ``gauges``, then
    ``every`` seconds' wait. The event loop never waits on the read, and cancelling this task
    (the gateway's shutdown, after 5 s) does not either: a read stuck on Redis is left to
    finish on its own."""
    while not stop.is_set():
        try:
            gauges.rows = await anyio.to_thread.run_sync(read_rows, abandon_on_cancel=True)
        except Exception as exc:  # the loop must outlive a Redis outage or a bad registry
            log.warning("model quality figures not read (none exported until read): %s", exc)
            gauges.rows = []
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
