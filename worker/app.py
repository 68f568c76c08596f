"""The Celery app a worker runs, built from settings, and ``batchery worker``'s entry point.

Each pool process loads its models once, after the fork (``worker_process_init``), warms them
up, then takes batches. ``worker.batching`` gathers messages into batches in the parent
process; the batch runs in a pool process.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import click
import redis
from celery import Celery, signals
from celery.exceptions import ImproperlyConfigured
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer import connections
from producer.errors import BatcheryError, ConfigError
from producer.ledger import backlog_jobs, settle
from producer.registry import ModelInfo, Registry
from producer.settings import Settings, redact_url
from producer.stopping import interrupted_while_loading
from producer.wire import (
    LANES,
    TASK_CLASSIFY,
    UNACKED_KEY,
    backlog_key,
    deaths_key,
    heartbeat_key,
    lane_queue,
    queue_keys,
    result_key,
)
from worker import logs, metrics, preprocess
from worker.batching import BATCH_DONE, DynamicBatches
from worker.compat import check_libraries
from worker.models import ModelCache, worker_kind
from worker.refusals import refusing_consumer
from worker.tasks import BatchRunner, RequestLike
from worker.transport import SentinelTransport, Transport

log = logging.getLogger(__name__)

_runner: BatchRunner | None = None


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client that rides out a Redis restart or a failover: retried with backoff for
    about 30 s."""
    return connections.client(
        settings,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=20),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=10,
    )


def runner(settings: Settings) -> BatchRunner:
    """This process's batch runner, created on first use."""
    global _runner
    if _runner is None:
        preprocess.limit_pillow(settings.max_image_pixels)
        threads = max(1, (os.cpu_count() or 1) // max(1, settings.concurrency))
        registry = Registry.from_settings(settings)  # checks manifests when signing is set up
        pinned = (
            ModelInfo.from_dir(settings.model_path, registry.verifier)
            if settings.model_path
            else None
        )
        recorded = metrics.for_settings(settings)
        models = ModelCache(
            registry,
            settings.default_model,
            settings.batch_size,
            threads=threads,
            pinned=pinned,
            max_loaded=settings.max_loaded_models,
            on_load=recorded.model_loaded if recorded else None,
        )
        _runner = BatchRunner(settings, models, redis_client(settings), recorded)
    return _runner


def warm_up(settings: Settings) -> None:
    """Load the default model before the first job; then keep house in the background."""
    batch_runner = runner(settings)
    try:
        batch_runner.models.get(
            None, lite_default(batch_runner) if batch_runner.kind == "lite" else None
        )
    except BatcheryError as exc:
        # Jobs for it will fail with this reason; the process stays up for other models.
        log.error("default model not loaded: %s", exc)
    name = f"{socket.gethostname()}:{os.getpid()}"
    interval = settings.model_watch_s

    def housekeeping() -> None:
        # A heartbeat `batchery status` counts, newly promoted versions picked up, and
        # messages lost in transit sent again (see producer/ledger.py).
        while True:
            try:
                # Its value, the worker's kind: producers check a live worker can serve a job.
                batch_runner.redis.set(heartbeat_key(name), batch_runner.kind,
                                       ex=int(interval * 3) + 5)  # fmt: skip
            except redis.RedisError as exc:
                log.warning("heartbeat not written: %s", exc)
            batch_runner.models.refresh()
            try:
                resent = batch_runner.ledger.sweep(
                    settings.visibility_timeout_s, settings.result_ttl_s, every_s=interval
                )
                if resent:
                    log.warning("sent again %d messages lost in transit", resent)
            except redis.RedisError as exc:
                log.warning("ledger not swept: %s", exc)
            time.sleep(interval)

    threading.Thread(target=housekeeping, name="batchery-housekeeping", daemon=True).start()

    def gone(**_: Any) -> None:
        # A pool process that stops cleanly takes its heartbeat with it: producers then see
        # at once which kinds of worker are up (a killed one's expires within seconds).
        with contextlib.suppress(redis.RedisError):
            batch_runner.redis.delete(heartbeat_key(name))

    signals.worker_process_shutdown.connect(gone, weak=False)


def lite_default(batch_runner: BatchRunner) -> str | None:
    """The version a lite worker warms up: the default model's promoted one if it is LiteRT,
    else its newest LiteRT version (None: it has none; jobs will say so)."""
    registry, name = batch_runner.models.registry, batch_runner.models.default_model
    try:
        versions = registry.versions(name)
        promoted = registry.promoted(name)
        lite = [v for v in versions if registry.get(name, v).format == "litert"]
    except BatcheryError:
        return None
    return promoted if promoted in lite else (lite[-1] if lite else None)


def count_deaths(
    settings: Settings, connect: Callable[[Settings], redis.Redis] = redis_client
) -> Callable[[list[str]], None]:
    """What the main process does when a pool process dies: count it against each job.

    Only against jobs still unanswered: a job answered meanwhile (by a copy kombu delivered
    again after the visibility timeout) did nothing wrong, and no later run would clear it.
    """
    client: redis.Redis | None = None

    def record(job_ids: list[str]) -> None:
        nonlocal client
        client = client or connect(settings)
        keys = [key for jid in job_ids for key in (result_key(jid), deaths_key(jid))]
        counted = client.eval(_COUNT_DEATHS, len(keys), *keys, settings.result_ttl_s)
        log.error("a worker process died holding %d jobs (%d unanswered); requeued",
                  len(job_ids), counted)  # fmt: skip

    return record


def settle_messages(
    settings: Settings, connect: Callable[[Settings], redis.Redis] = redis_client
) -> Callable[[list[str]], None]:
    """What the main process does once every part of a split message is stored: strike it
    off the ledger and its jobs off the backlog (a whole message is settled with its
    results, in the batch's own round trip)."""
    client: redis.Redis | None = None

    def strike(message_ids: list[str]) -> None:
        nonlocal client
        client = client or connect(settings)
        with client.pipeline(transaction=False) as pipe:
            settle(pipe, settings.queue, message_ids)
            pipe.execute()

    return strike


# KEYS: result key, deaths key, per job. ARGV[1]: the deaths keys' TTL.
_COUNT_DEATHS = """
local counted = 0
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('INCR', KEYS[i + 1])
    redis.call('EXPIRE', KEYS[i + 1], tonumber(ARGV[1]))
    counted = counted + 1
  end
end
return counted
"""


#: Seconds kombu's restore lock outlives a worker that died holding it.
RESTORE_LOCK_S = 10


def create_app(settings: Settings) -> Celery:
    """The worker's Celery app: JSON only, results in Redis, the batched classify task."""
    url = connections.celery_url(settings)
    app = Celery("batchery", broker=url, backend=url, set_as_current=True)
    sentinel = connections.sentinel_transport_options(settings)
    # Prefetch is weighed in jobs and bytes (worker.transport): Celery's own count, in
    # messages, is only an outer bound (a message carries at least one job).
    prefetch = math.ceil(settings.prefetch_job_limit / max(1, settings.concurrency))
    # Signed messages only, when signing is set up; JSON alone otherwise. Never pickle.
    accept = ["auth"] if settings.signing else ["json"]
    app.conf.update(
        task_serializer=accept[0],
        result_serializer="json",
        accept_content=accept,
        result_accept_content=["json"],
        result_expires=settings.result_ttl_s,
        task_default_queue=settings.queue,
        task_ignore_result=True,
        worker_prefetch_multiplier=max(1, prefetch),
        worker_concurrency=settings.concurrency,
        # Celery's prefork pool, whose warm shutdown waits for every batch sent (worker.prefork).
        worker_pool="worker.prefork:TaskPool",
        # Loading TensorFlow and a model takes longer than Celery's default 4 s.
        worker_proc_alive_timeout=300,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # ride out a Redis restart, however long
        # At-least-once: a message a dead worker held comes back after the visibility
        # timeout; kombu looks for such messages every second, not every 10 s x 10 calls.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
            # kombu's lock around that look (one worker at a time; each restore is a WATCH
            # transaction, so two at once are harmless): a worker killed while it holds the
            # lock, or a Redis restarted then, would stop every restore for its default 5
            # minutes.
            "unacked_mutex_expire": RESTORE_LOCK_S,
            "max_message_bytes": settings.message_limit,
            "prefetch_jobs": settings.prefetch_job_limit,
            "prefetch_bytes": settings.prefetch_bytes,
            **sentinel,
        },
        result_backend_transport_options=sentinel,
        # A dead pool process's batch is requeued after this wait (Celery's default: 10 s).
        # Results it stored before dying are kept: a redelivered job is not recomputed.
        worker_lost_wait=1.0,
        # SIGTERM: finish the batch in hand; unacknowledged messages go back to the queue.
        worker_soft_shutdown_timeout=10.0,
        worker_enable_soft_shutdown_on_idle=True,
        # Per-message events for Flower and `celery events`; on one-job messages they are
        # nearly half of the main process's work (BATCHERY_TASK_EVENTS=0 turns them off).
        worker_send_task_events=settings.task_events,
        task_send_sent_event=False,
        # Refused messages: logged without their bodies, their jobs failed (see refusals).
        worker_consumer=refusing_consumer(settings, redis_client),
        # Unreadable messages dropped rather than stopping the worker (see transport).
        broker_transport=SentinelTransport if settings.sentinel else Transport,
        broker_use_ssl=settings.redis_ssl() or None,
        redis_backend_use_ssl=settings.redis_ssl() or None,
    )
    if settings.signing:
        set_up_signing(app, settings)

    @app.task(
        base=DynamicBatches,
        name=TASK_CLASSIFY,
        flush_every=settings.batch_size,
        flush_interval=max(settings.batch_wait_ms, 0.5) / 1000.0,
        pool_slots=settings.concurrency,
        budget_s=settings.batch_budget_ms / 1000.0,
        time_limit=settings.batch_time_limit_s,
        on_worker_lost=staticmethod(count_deaths(settings)),  # a plain function, not a method
        settle_split=staticmethod(settle_messages(settings)),
        ignore_result=True,
    )
    def classify(requests: Sequence[RequestLike]) -> tuple[str, float, bool, list[Any]]:
        # What the batch took, for the main process's cost model (worker.budget); "cold"
        # if it loaded a model, whose seconds say nothing of the next batch's; and the
        # versions' own budgets seen so far.
        batch_runner = runner(settings)
        loads, started = batch_runner.models.loads, time.perf_counter()
        batch_runner.run(requests)
        seconds = time.perf_counter() - started
        budgets = [[*key, budget] for key, budget in batch_runner.budgets.items()]
        return BATCH_DONE, seconds, batch_runner.models.loads != loads, budgets

    def load_models(**_: Any) -> None:
        warm_up(settings)

    signals.worker_process_init.connect(load_models, weak=False)
    return app


def set_up_signing(app: Celery, settings: Settings) -> None:
    """Accept only task messages signed by a certificate in BATCHERY_SIGNING_CERTS."""
    app.conf.update(
        security_key=str(settings.signing_key),
        security_certificate=str(settings.signing_cert),
        security_cert_store=str(settings.signing_certs),
        security_digest="sha256",
    )
    try:
        # json stays readable for results (auth is registered, enabled, after this list is
        # applied); task messages must match accept_content, which is auth alone.
        app.setup_security(allowed_serializers=["json"])
    except ImproperlyConfigured as exc:
        raise ConfigError(f"message signing: {exc}") from exc


def run_worker(settings: Settings, loglevel: str = "INFO") -> None:
    """Run a Celery worker for ``settings`` in the foreground (``batchery worker``)."""
    check_libraries()
    if interrupted_while_loading():  # a Ctrl-C Python dropped while TensorFlow loaded
        raise KeyboardInterrupt
    kind = worker_kind(settings.worker_kind)
    lanes = LANES if kind == "full" else ("lite",)
    logging.getLogger(__name__).info(
        "broker %s, a %s worker (%s)",
        redact_url(settings.redis_url),
        kind,
        "every format" if kind == "full" else "LiteRT only",
    )
    metrics.prepare(settings)  # before anything imports prometheus_client or forks
    app = create_app(settings)
    logs.set_up(settings.log_format)
    if settings.metrics_port is not None:
        queue_reader = redis_client(settings)

        def read_queue() -> tuple[int, int, int]:
            with queue_reader.pipeline(transaction=False) as pipe:
                for key in queue_keys(settings.queue):  # every lane's, every priority's
                    pipe.llen(key)
                pipe.hlen(UNACKED_KEY)
                pipe.get(backlog_key(settings.queue))
                *depths, in_flight, backlog = pipe.execute()
            return sum(int(d) for d in depths), int(in_flight), backlog_jobs(backlog)

        metrics.serve(settings, read_queue)
        atexit.register(metrics.clean_up)
    try:
        _start(app, settings, lanes, loglevel)
    except click.exceptions.Abort as exc:
        # A Ctrl-C that lands while Celery's command line is starting (its imports): click
        # turns it into Abort, which would end the command with status 1 and a traceback.
        raise KeyboardInterrupt from exc


def _start(app: Celery, settings: Settings, lanes: tuple[str, ...], loglevel: str) -> None:
    app.worker_main(
        argv=[
            "worker",
            f"--concurrency={settings.concurrency}",
            # A TensorFlow worker takes both lanes, a lite one only LiteRT jobs (wire.LANES).
            "--queues=" + ",".join(lane_queue(settings.queue, lane) for lane in lanes),
            f"--loglevel={loglevel}",
            "--pool=prefork",
            f"--hostname=batchery-{os.getpid()}@%h",
            "--without-mingle",
            "--without-gossip",
        ]
    )
