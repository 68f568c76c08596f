"""Model quality in Prometheus, with fakeredis: the gateway's gauges (gateway/quality.py) from
the monitoring counts workers write, its refresh off the event loop, /metrics serving them;
and the workers' ``batchery_top1_score`` histogram, observed in ``BatchRunner.report``."""

from __future__ import annotations

import asyncio
import math
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from gateway.quality import (
    EXPORTED,
    QualityGauges,
    VersionQuality,
    read,
    read_decisions,
    refresh,
)
from producer import connections
from producer.client import Client
from producer.monitoring import SCORE_EDGES, add_counts, observe
from producer.registry import Registry
from producer.settings import Settings
from producer.wire import (
    STATS_KEY,
    SUCCESS,
    Job,
    feedback_counts_key,
    jobs_to_kwargs,
    live_baseline_key,
)
from tests.factories import Request, corrupt_png, digit_paths
from tests.unit.asgi import AsgiGateway

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mnist-cnn"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """A copy of the shipped registry's manifests (versions 1, 2 and 3; 2 promoted)."""
    for manifest in (ROOT / "models" / MODEL).glob("*/model.json"):
        folder = tmp_path / "models" / MODEL / manifest.parent.name
        folder.mkdir(parents=True)
        shutil.copy(manifest, folder)
    (tmp_path / "models" / MODEL / "PROMOTED").write_text("2\n")
    found = Registry(tmp_path / "models")
    assert found.versions(MODEL) == ["1", "2", "3"] and found.promoted(MODEL) == "2"
    return found


def batch_counts(n: int, seed: int, labels: str = "0123456789", score: float | None = None,
                 brightness: float = 0.2) -> Any:  # fmt: skip
    """What a worker's observe() counts for ``n`` jobs: labels in turn, top-1 scores spread
    over 0.55..0.99995 (or all ``score``), 28x28 inputs of about ``brightness`` mean
    intensity."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((n, 28, 28, 1)) < brightness).astype(np.uint8) * 255
    answers = [labels[i % len(labels)] for i in range(n)]
    scores = rng.choice(HEALTHY_SCORES, n) if score is None else np.full(n, score)
    return observe(pixels, answers, scores, [("png", 28, 28)] * n)


#: Top-1 scores of a healthy model, in several of monitoring's score bins.
HEALTHY_SCORES = [0.55, 0.85, 0.95, 0.995, 0.9995, 0.99995]


def baseline(n: int) -> dict[str, Any]:
    """A recorded baseline of ``n`` healthy jobs, as ``models evaluate --record`` keeps it."""
    return {"jobs": n, "counts": dict(batch_counts(n, seed=1)), "source": "test"}


def write(fake: fakeredis.FakeRedis, version: str, counts: Any, model: str = MODEL) -> None:
    """Counts added as a worker adds them: into its result pipeline."""
    with fake.pipeline(transaction=False) as pipe:
        add_counts(pipe, model, version, counts)
        pipe.execute()


def scraped(gauges: QualityGauges) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the gauges export, keyed by (name, sorted labels)."""
    registry = CollectorRegistry()
    registry.register(gauges)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


def of(version: str, **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"model": MODEL, "version": version, **extra}.items()))


def test_the_gauges_follow_the_counts_workers_write(registry: Registry) -> None:
    fake = fakeredis.FakeRedis()
    settings = Settings(model_dir=registry.root, monitor_window_jobs=100, drift_threshold=0.2,
                        low_confidence=0.5)  # fmt: skip
    # Version 1 has a recorded baseline (healthy inputs and answers); its live window has
    # shifted: every answer a 7, low scores, brighter inputs.
    registry.record_baseline(MODEL, "1", baseline(500))
    write(fake, "1", batch_counts(300, seed=2, labels="7", score=0.3, brightness=0.6))
    # Version 2 (promoted) has none: its first 100 jobs will be it. 60 so far.
    write(fake, "2", batch_counts(60, seed=3))
    fake.hset(feedback_counts_key(MODEL, "2"), mapping={"3\t3": 45, "3\t5": 5})
    # Counts of a version or a model the registry does not hold: never a label.
    write(fake, "9", batch_counts(50, seed=4))
    write(fake, "3", batch_counts(50, seed=5), model="ghost")

    fake.hset(STATS_KEY, mapping={"canary_promoted": 2, "canary_rolled_back": 1})
    gauges = QualityGauges()
    gauges.rows = read(fake, registry, settings)
    gauges.decisions = read_decisions(fake)
    everything = scraped(gauges)
    assert {name for name, _ in everything} == set(EXPORTED)
    assert everything[("batchery_canary_decisions_total", (("decision", "promoted"),))] == 2
    assert everything[("batchery_canary_decisions_total", (("decision", "rolled_back"),))] == 1
    first = {k: v for k, v in everything.items() if k[0].startswith("batchery_model_")}
    versions = {dict(labels)["version"] for _, labels in first}
    assert versions == {"1", "2"}  # 3 served nothing and is not promoted; 9 is not held
    assert {dict(labels)["model"] for _, labels in first} == {MODEL}

    # Version 1: drifted, on every distribution the shift touched; its figures as they are.
    drift = {dict(labels)["distribution"]: value for (name, labels), value in first.items()
             if name == "batchery_model_drift" and dict(labels)["version"] == "1"}  # fmt: skip
    assert set(drift) == {"class mix", "top-1 score", "pixel mean", "pixel spread",
                          "input size", "input format"}  # fmt: skip
    assert drift["class mix"] > 0.5 and drift["top-1 score"] > 0.5 and drift["pixel mean"] > 0.5
    assert drift["input size"] == 0 and drift["input format"] == 0  # 28x28 PNGs both
    assert first[("batchery_model_drifted", of("1"))] == 1
    assert first[("batchery_model_drift_threshold", of("1"))] == 0.2
    assert first[("batchery_model_window_jobs", of("1"))] == 300
    assert first[("batchery_model_low_confidence_ratio", of("1"))] == 1.0  # all under 0.5
    assert first[("batchery_model_feedback_jobs", of("1"))] == 0
    assert math.isnan(first[("batchery_model_live_accuracy", of("1"))])  # no feedback: NaN

    # Version 2: no baseline yet, so no distance and not drifted; its feedback counted.
    assert not any(name == "batchery_model_drift" and dict(labels)["version"] == "2"
                   for name, labels in first)  # fmt: skip
    assert first[("batchery_model_drifted", of("2"))] == 0
    assert first[("batchery_model_window_jobs", of("2"))] == 60
    assert first[("batchery_model_low_confidence_ratio", of("2"))] == 0.0
    assert first[("batchery_model_feedback_jobs", of("2"))] == 50
    assert first[("batchery_model_live_accuracy", of("2"))] == 0.9

    # 60 more jobs like them: version 2's first live window becomes its baseline (kept in
    # Redis), and its live window is measured against it: no drift.
    write(fake, "2", batch_counts(60, seed=6))
    gauges.rows = read(fake, registry, settings)
    second = scraped(gauges)
    assert fake.get(live_baseline_key(MODEL, "2")) is not None
    drift2 = {dict(labels)["distribution"]: value for (name, labels), value in second.items()
              if name == "batchery_model_drift" and dict(labels)["version"] == "2"}  # fmt: skip
    assert len(drift2) == 6 and max(drift2.values()) < 0.2
    assert second[("batchery_model_drifted", of("2"))] == 0
    assert second[("batchery_model_window_jobs", of("2"))] == 120


def test_a_drift_over_the_threshold_in_too_few_jobs_is_shown_not_flagged(
    registry: Registry,
) -> None:
    fake = fakeredis.FakeRedis()
    settings = Settings(model_dir=registry.root, monitor_window_jobs=1000)
    registry.record_baseline(MODEL, "2", baseline(500))
    write(fake, "2", batch_counts(150, seed=2, labels="7"))  # under MIN_JOBS (200)
    gauges = QualityGauges()
    gauges.rows = read(fake, registry, settings)
    samples = scraped(gauges)
    assert samples[("batchery_model_drift", of("2", distribution="class mix"))] > 0.5
    assert samples[("batchery_model_drifted", of("2"))] == 0
    write(fake, "2", batch_counts(50, seed=3, labels="7"))  # 200: enough
    gauges.rows = read(fake, registry, settings)
    assert scraped(gauges)[("batchery_model_drifted", of("2"))] == 1


def test_an_idle_promoted_version_is_exported_with_no_ratio() -> None:
    fake = fakeredis.FakeRedis()
    registry = Registry(ROOT / "models")
    rows = read(fake, registry, Settings(model_dir=registry.root))
    assert [(r.model, r.version) for r in rows] == [(MODEL, registry.promoted(MODEL))]
    samples = scraped(_with(rows))
    version = registry.promoted(MODEL)
    assert samples[("batchery_model_window_jobs", of(version))] == 0
    assert math.isnan(samples[("batchery_model_low_confidence_ratio", of(version))])
    assert samples[("batchery_model_drifted", of(version))] == 0


def _with(rows: list[VersionQuality]) -> QualityGauges:
    gauges = QualityGauges()
    gauges.rows = rows
    return gauges


ROW = VersionQuality(MODEL, "2", 10, 0.0, (), 0.2, False, 0, None)


def test_the_refresh_reads_in_a_thread_and_drops_what_it_cannot_read() -> None:
    """The loop goes on while a read is slow; a read that fails leaves no stale figure; the
    next one brings the figures back; stop ends it at once."""
    threads: list[threading.Thread] = []

    def slow_read() -> list[VersionQuality]:
        threads.append(threading.current_thread())
        time.sleep(0.2)  # a slow Redis
        if len(threads) == 2:
            raise redis.ConnectionError("Redis went away")
        return [ROW]

    async def main() -> int:
        gauges = QualityGauges()
        stop = asyncio.Event()
        task = asyncio.create_task(refresh(gauges, slow_read, stop, every=0.05))
        ticks = 0
        while not gauges.rows:  # the first read
            ticks += 1
            await asyncio.sleep(0.01)
        while gauges.rows:  # the second fails: nothing exported
            await asyncio.sleep(0.01)
        assert scraped(gauges) == {}
        while not gauges.rows:  # the third reads again
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 1.0)  # the wait between reads ends with stop
        return ticks

    ticks = asyncio.run(main())
    assert ticks >= 10, "the event loop waited on the read"
    assert len(threads) >= 3 and threading.main_thread() not in threads


def test_a_read_stuck_on_redis_does_not_hold_the_gateways_shutdown() -> None:
    """The gateway stops the refresh, then waits 5 s at most (its lifespan): cancelling it
    returns at once even while a read hangs."""
    started = threading.Event()

    def stuck() -> list[VersionQuality]:
        started.set()
        time.sleep(2)
        return [ROW]

    async def main() -> float:
        gauges, stop = QualityGauges(), asyncio.Event()
        task = asyncio.create_task(refresh(gauges, stuck, stop))
        while not started.is_set():
            await asyncio.sleep(0.01)
        stop.set()
        began = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(task, 0.1)
        return time.monotonic() - began

    assert asyncio.run(main()) < 1.0


@pytest.fixture
def gateway(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> Iterator[AsgiGateway]:
    from gateway import app as gateway_app

    server = fakeredis.FakeServer()
    fake = fakeredis.FakeRedis(server=server)
    registry.record_baseline(MODEL, "2", baseline(500))
    write(fake, "2", batch_counts(300, seed=2, labels="7", score=0.3))

    def sync_client(settings: Settings) -> Client:
        return Client(settings=settings, redis_client=fakeredis.FakeRedis(server=server))

    monkeypatch.setattr(gateway_app, "Client", sync_client)
    monkeypatch.setattr(connections, "async_client",
                        lambda *a, **k: fakeredis.FakeAsyncRedis(server=server))  # fmt: skip
    app = AsgiGateway(gateway_app.create_app(Settings(model_dir=registry.root), webhooks=False))
    yield app
    app.close()


def test_the_gateway_serves_the_figures_on_metrics(gateway: AsgiGateway) -> None:
    """`batchery serve` reads the figures as it starts, then every 30 s; /metrics reports
    them."""
    deadline = time.monotonic() + 10
    while True:
        text = gateway.get("/metrics").text
        if 'batchery_model_drifted{model="mnist-cnn",version="2"}' in text:
            break
        assert time.monotonic() < deadline, text
        gateway.wait(0.05)
    assert 'batchery_model_drifted{model="mnist-cnn",version="2"} 1.0' in text
    assert 'batchery_model_window_jobs{model="mnist-cnn",version="2"} 300.0' in text
    assert 'batchery_model_low_confidence_ratio{model="mnist-cnn",version="2"} 1.0' in text
    assert 'batchery_model_drift{distribution="class mix",model="mnist-cnn",version="2"}' in text
    assert "batchery_gateway_requests_total" in text  # beside the gateway's own


# --- the workers' histogram of top-1 scores ---------------------------------------------


def test_report_observes_each_answered_jobs_top1_score(models, fake_redis) -> None:
    from prometheus_client import REGISTRY

    from worker.metrics import Metrics
    from worker.tasks import BatchRunner

    metrics = Metrics()
    try:
        runner = BatchRunner(Settings(), models, fake_redis, recorded=metrics)
        paths = digit_paths(12)
        jobs = [Job(f"j{i}", path.read_bytes()) for i, path in enumerate(paths)]
        jobs.append(Job("bad", corrupt_png(paths[0])))  # a FAILURE: no score
        results = runner.run([Request("m", jobs_to_kwargs(jobs))])
        scores = [r.score for r in results if r.status == SUCCESS]
        assert len(scores) == 12 and all(s is not None for s in scores)
        version = models.resolve(None, None).version
        labels = {"model": MODEL, "version": version}

        def sample(name: str, **extra: str) -> float | None:
            return REGISTRY.get_sample_value(name, {**labels, **extra})

        assert sample("batchery_top1_score_count") == 12
        assert sample("batchery_top1_score_sum") == pytest.approx(sum(scores))  # type: ignore[arg-type]
        for edge in SCORE_EDGES[1:]:
            under = sum(s <= edge for s in scores)  # type: ignore[operator]
            assert sample("batchery_top1_score_bucket", le=str(float(edge))) == under
        assert sample("batchery_top1_score_bucket", le="+Inf") == 12
    finally:
        for collector in vars(metrics).values():
            REGISTRY.unregister(collector)
