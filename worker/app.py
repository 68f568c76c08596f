"""The Celery app a worker runs, built from settings, and ``batchery worker``'s entry point.

Each pool process loads its models once, after the fork (``worker_process_init``), warms them
up, then takes batches. ``worker.batching`` gathers messages into batches in the parent
process; the batch runs in a pool process.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery, signals

from producer.errors import BatcheryError
from producer.registry import ModelInfo, Registry
from producer.settings import Settings, redact_url
from producer.wire import TASK_CLASSIFY
from worker.batching import BATCH_DONE, DynamicBatches
from worker.models import ModelCache
from worker.tasks import BatchRunner, RequestLike

log = logging.getLogger(__name__)

_runner: BatchRunner | None = None


def runner(settings: Settings) -> BatchRunner:
    """This process's batch runner, created on first use."""
    global _runner
    if _runner is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, settings.concurrency))
        pinned = ModelInfo.from_dir(settings.model_path) if settings.model_path else None
        models = ModelCache(
            Registry(settings.model_dir),
            settings.default_model,
            settings.batch_size,
            threads=threads,
            pinned=pinned,
            max_loaded=settings.max_loaded_models,
        )
        _runner = BatchRunner(settings, models, redis.Redis.from_url(settings.redis_url))
    return _runner


def warm_up(settings: Settings) -> None:
    """Load the default model before the first job, and start watching for promotions."""
    models = runner(settings).models
    try:
        models.get(None, None)
    except BatcheryError as exc:
        # Jobs for it will fail with this reason; the process stays up for other models.
        log.error("default model not loaded: %s", exc)
    models.start_watcher(settings.model_watch_s)


def create_app(settings: Settings) -> Celery:
    """The worker's Celery app: JSON only, results in Redis, the batched classify task."""
    app = Celery(
        "batchery", broker=settings.redis_url, backend=settings.redis_url, set_as_current=True
    )
    # Room for two full batches per pool process, so a batch can fill while one runs.
    prefetch = math.ceil(2 * settings.batch_size / max(1, settings.concurrency))
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=settings.result_ttl_s,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        worker_prefetch_multiplier=max(1, prefetch),
        worker_concurrency=settings.concurrency,
        # Loading TensorFlow and a model takes longer than Celery's default 4 s.
        worker_proc_alive_timeout=300,
        broker_connection_retry_on_startup=True,
        worker_send_task_events=True,
        task_send_sent_event=False,
    )

    @app.task(
        base=DynamicBatches,
        name=TASK_CLASSIFY,
        flush_every=settings.batch_size,
        flush_interval=max(settings.batch_wait_ms, 0.5) / 1000.0,
        pool_slots=settings.concurrency,
        ignore_result=True,
    )
    def classify(requests: Sequence[RequestLike]) -> str:
        runner(settings).run(requests)
        return BATCH_DONE

    def load_models(**_: Any) -> None:
        warm_up(settings)

    signals.worker_process_init.connect(load_models, weak=False)
    return app


def run_worker(settings: Settings, loglevel: str = "INFO") -> None:
    """Run a Celery worker for ``settings`` in the foreground (``batchery worker``)."""
    logging.getLogger(__name__).info("broker %s", redact_url(settings.redis_url))
    app = create_app(settings)
    app.worker_main(
        argv=[
            "worker",
            f"--concurrency={settings.concurrency}",
            f"--queues={settings.queue}",
            f"--loglevel={loglevel}",
            "--pool=prefork",
            f"--hostname=batchery-{os.getpid()}@%h",
            "--without-mingle",
            "--without-gossip",
        ]
    )
