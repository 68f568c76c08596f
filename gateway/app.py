"""``batchery serve``: the HTTP gateway, a producer like any other (no TensorFlow).

Checks what it is sent with the :class:`~producer.client.Client`'s own checks, pushes from
its event loop (:mod:`gateway.outbox`), waits on one shared subscriber connection
(:mod:`gateway.waiter`), delivers webhooks (:mod:`gateway.delivery`), and serves the page
in ``gateway/web/``. Stateless: run as many
as needed behind a load balancer; they share everything through Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import re
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from gateway import openapi
from gateway.apikeys import ApiKeys, RateLimiter
from gateway.delivery import Deliverer
from gateway.guard import GatewayMetrics, Guard, headers_in_time
from gateway.outbox import Outbox
from gateway.quality import QualityGauges, VersionQuality, read_decisions, refresh
from gateway.quality import read as read_quality
from gateway.waiter import ResultWaiter
from producer import connections
from producer.client import Client, check_label
from producer.errors import (
    BatcheryError,
    ConfigError,
    FeedbackError,
    ImageTooLargeError,
    InvalidImageError,
    InvalidLabelError,
    JobNotFoundError,
    ModelNotFoundError,
    NoWorkerError,
    QueueFullError,
    RedisUnavailableError,
    ReplicaAckError,
    UnsupportedFormatError,
    WebhookRefusedError,
    WireError,
)
from producer.images import check_image_bytes
from producer.ledger import backlog_jobs
from producer.registry import Registry
from producer.settings import Settings, redact_url
from producer.wire import (
    HEARTBEAT_PREFIX,
    MAX_JOB_ID_CHARS,
    MAX_JOBS_PER_MESSAGE,
    backlog_key,
    check_job_id,
    decode_job_record,
    decode_result_meta,
    excerpt,
    job_key,
    new_job_ids,
    pending_result,
    result_key,
)

log = logging.getLogger("batchery.gateway")

WEB = Path(__file__).resolve().parent / "web"
#: Most images one request may carry.
MAX_IMAGES = MAX_JOBS_PER_MESSAGE
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_RAW_TYPES = set(openapi.IMAGE_TYPES) | {"image/x-ms-bmp", "image/jpg"}
_JOB_FIELDS = ("model", "version", "priority", "deadline_s", "explain", "callback_url")
_JOB_ID = re.compile(openapi.JOB_ID_PATTERN)
_VERSION = re.compile(openapi.VERSION_PATTERN)


@dataclass
class Gateway:
    """What the routes share: settings, the Redis clients, keys, limiter, waiter, metrics."""

    settings: Settings
    client: Client
    redis: aioredis.Redis
    keys: ApiKeys | None
    limiter: RateLimiter | None
    waiter: ResultWaiter
    outbox: Outbox
    metrics: GatewayMetrics
    webhooks: bool

    async def authorize(self, request: Request, cost: int = 1) -> str | None:
        """The API key's name (None when no keys are configured); 401 or 429 if refused."""
        if self.keys is None:
            return None
        owner = self.keys.name_of(request.headers.get("authorization"))
        if owner is None:
            raise HTTPException(401, "send Authorization: Bearer <API key>",
                                {"WWW-Authenticate": 'Bearer realm="batchery"'})  # fmt: skip
        request.scope.setdefault("state", {})["owner"] = owner
        await self.charge(owner, cost)
        return owner

    async def charge(self, owner: str | None, cost: int, images: int = 0) -> None:
        """Spend ``cost`` of ``owner``'s rate (429 with Retry-After when it is spent).

        ``images``: a request of more than a whole burst can never pass: 429 saying so.
        """
        if owner is None or self.limiter is None:
            return
        if images > self.limiter.burst:
            raise HTTPException(429, f"{images} images is more than this key's burst of "
                                f"{self.limiter.burst} (BATCHERY_API_BURST): send fewer a "
                                "request")  # fmt: skip
        if cost <= 0:
            return
        try:
            wait = await self.limiter.wait_s(owner, cost)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise _unavailable(self, exc) from exc
        if wait > 0:
            raise HTTPException(429, f"rate limit of {self.limiter.rate:g}/s for key "
                                f"{owner!r} spent (BATCHERY_API_RATE)",
                                {"Retry-After": str(max(1, math.ceil(wait)))})  # fmt: skip


def _error_response(status: int, error: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": error}, status, headers=headers)


def refusal(exc: BaseException) -> HTTPException:
    """A Batchery error as the HTTP status a client can act on."""
    text = str(exc)
    if isinstance(exc, ImageTooLargeError):
        return HTTPException(413, text)
    if isinstance(exc, UnsupportedFormatError):
        return HTTPException(415, text)
    if isinstance(exc, QueueFullError):
        return HTTPException(429, text, {"Retry-After": "1"})
    if isinstance(exc, (RedisUnavailableError, ReplicaAckError)):
        return HTTPException(503, text, {"Retry-After": "1"})
    if isinstance(exc, NoWorkerError):
        return HTTPException(503, text, {"Retry-After": "5"})
    if isinstance(exc, JobNotFoundError):
        return HTTPException(404, text)
    if isinstance(exc, FeedbackError) and not isinstance(exc, InvalidLabelError):
        return HTTPException(409, text)  # not answered, no prediction, or given already
    if isinstance(exc, (InvalidImageError, WireError, ModelNotFoundError, WebhookRefusedError,
                        InvalidLabelError)):  # fmt: skip
        return HTTPException(400, text)
    return HTTPException(500, f"{type(exc).__name__}: {text}")


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise HTTPException(400, f"{name} must be true or false, got {raw[:40]!r}")


def _number(name: str, raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number, got {raw[:40]!r}") from None
    if not math.isfinite(value):
        raise HTTPException(400, f"{name} must be a finite number")
    return value


async def submit(request: Request) -> Response:
    """``POST /v1/jobs[?wait=S]``: one raw image, or many as multipart/form-data.

    202 with the job ids; with ``wait``, 200 with their results if all land within S.
    """
    gw: Gateway = request.app.state.gateway
    owner = await gw.authorize(request)
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    fields: dict[str, str] = {k: v for k, v in request.query_params.items() if k in _JOB_FIELDS}
    limits = gw.settings.max_image_bytes, gw.settings.max_image_pixels
    images: list[tuple[str | None, bytes]] = []
    if kind == "multipart/form-data":
        async with request.form(max_files=MAX_IMAGES, max_fields=len(_JOB_FIELDS) + 1) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    data = await value.read(limits[0] + 1)
                    images.append((value.filename or key, data))
                elif key in _JOB_FIELDS:
                    fields[key] = value
                else:
                    raise HTTPException(400, f"unknown form field {key[:40]!r} (fields: "
                                        f"{', '.join(_JOB_FIELDS)}, and image files)")  # fmt: skip
    elif kind in _RAW_TYPES:
        images.append((None, await request.body()))
    else:
        raise HTTPException(415, f"send one image as the body ({', '.join(openapi.IMAGE_TYPES)})"
                            " or several as multipart/form-data, not "
                            f"{kind[:60] or 'no Content-Type'}")  # fmt: skip
    if not images:
        raise HTTPException(400, "no image in the request")
    await gw.charge(owner, len(images) - 1, len(images))  # the request was charged 1
    try:
        for number, (name, data) in enumerate(images, 1):
            check_image_bytes(
                data, name or ("the body" if kind in _RAW_TYPES else f"image {number}"), *limits
            )
        callback = fields.get("callback_url")
        if callback is not None and not gw.webhooks:
            raise WebhookRefusedError("this gateway delivers no webhooks: it has no "
                                      "BATCHERY_WEBHOOK_SECRET")  # fmt: skip
        # The Client's own checks, then a push from this event loop (no thread hop).
        # A field sent empty is refused like any other bad value, not taken as absent.
        version = fields.get("version")
        if version is not None and _VERSION.fullmatch(version) is None:
            raise HTTPException(400, f"version {excerpt(version)} is not a version number")
        template = gw.client.job_template(
            fields.get("model"), version, fields.get("priority", "normal"),
            _number("deadline_s", fields.get("deadline_s")),
            explain=_flag("explain", fields.get("explain", "false")),
        )  # fmt: skip
        record = gw.client.job_record(callback or None, owner)
        ids = new_job_ids(len(images))
        batch = [template.stamped(job_id, data)
                 for job_id, (_, data) in zip(ids, images, strict=True)]  # fmt: skip
        wait = min(_wait(request), gw.settings.http_max_wait_s)

        async def push() -> None:
            await gw.outbox.enqueue(batch, {job.id: record for job in batch})

        metas: list[Any] = []
        if wait > 0:
            # Submit and wait in one request: subscribed first, pushed second, so no answer
            # can come before anyone listens. 200 once every job is answered, else 202 with
            # the answers that came.
            metas = await gw.waiter.wait(ids, wait, then=push)
        else:
            await push()
    except BatcheryError as exc:
        raise refusal(exc) from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise _unavailable(gw, exc) from exc
    gw.metrics.jobs.labels(owner or "-").inc(len(ids))
    jobs: list[dict[str, Any]] = [
        {"job_id": job_id, "location": f"/v1/jobs/{job_id}",
         **({"file": name} if name is not None else {})}
        for job_id, (name, _) in zip(ids, images, strict=True)
    ]  # fmt: skip
    headers = {"Location": jobs[0]["location"]} if len(jobs) == 1 else None
    if not metas:
        return JSONResponse({"jobs": jobs}, 202, headers=headers)
    for job, raw in zip(jobs, metas, strict=True):
        if raw is not None:
            job["result"] = decode_result_meta(raw)
    answered = all(raw is not None for raw in metas)
    return JSONResponse({"jobs": jobs}, 200 if answered else 202, headers=headers)


def _wait(request: Request) -> float:
    wait = _number("wait", request.query_params.get("wait")) or 0.0
    if wait < 0:
        raise HTTPException(400, "wait must be at least 0")
    return wait


async def _known(gw: Gateway, job_id: str, owner: str | None) -> tuple[Any, bool]:
    """The job's stored result meta and whether the caller may see the job (404 if not)."""
    try:
        async with gw.redis.pipeline(transaction=False) as pipe:
            pipe.get(result_key(job_id))
            pipe.get(job_key(job_id))
            raw, record = await pipe.execute()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise _unavailable(gw, exc) from exc
    if raw is None and record is None:
        raise HTTPException(404, f"no job {job_id}")
    recorded_owner, _ = decode_job_record(record)
    if owner is not None and recorded_owner is not None and recorded_owner != owner:
        raise HTTPException(404, f"no job {job_id}")  # not saying whose it is
    return raw, record is not None


def _unavailable(gw: Gateway, exc: BaseException) -> HTTPException:
    return HTTPException(503, f"cannot reach Redis at {redact_url(gw.settings.redis_url)}: "
                         f"{exc}", {"Retry-After": "1"})  # fmt: skip


def _job_id(request: Request) -> str:
    """The path's job id, by the document's rule (a URL-safe part of the wire's)."""
    job_id = request.path_params["job_id"]
    if _JOB_ID.fullmatch(job_id) is None:
        raise HTTPException(400, f"job id {excerpt(job_id)} is not an id: printable ASCII "
                            f"without '/', not starting with '.', 1 to {MAX_JOB_ID_CHARS} "
                            "characters")  # fmt: skip
    try:
        return check_job_id(job_id)
    except WireError as exc:
        raise HTTPException(400, str(exc)) from exc


async def get_job(request: Request) -> Response:
    """``GET /v1/jobs/{id}[?wait=S]``: the result dict, PENDING until answered."""
    gw: Gateway = request.app.state.gateway
    owner = await gw.authorize(request)
    job_id = _job_id(request)
    wait = _wait(request)
    raw, _ = await _known(gw, job_id, owner)
    if raw is None and wait > 0:
        try:
            (raw,) = await gw.waiter.wait([job_id], min(wait, gw.settings.http_max_wait_s))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise _unavailable(gw, exc) from exc
    result = pending_result(job_id) if raw is None else decode_result_meta(raw)
    return JSONResponse(result)


async def cancel_job(request: Request) -> Response:
    """``POST /v1/jobs/{id}/cancel``: cancel a job not yet computed (409 if already answered).

    Not a DELETE: the job stays, and GET answers its CANCELLED result.
    """
    gw: Gateway = request.app.state.gateway
    owner = await gw.authorize(request)
    job_id = _job_id(request)
    raw, _ = await _known(gw, job_id, owner)
    if raw is None:
        try:
            await run_in_threadpool(gw.client.cancel, job_id)
        except BatcheryError as exc:
            raise refusal(exc) from exc
        raw = await gw.redis.get(result_key(job_id))
    result = pending_result(job_id) if raw is None else decode_result_meta(raw)
    cancelled = result["status"] == "CANCELLED"
    return JSONResponse(result, 200 if cancelled else 409)


async def give_feedback(request: Request) -> Response:
    """``POST /v1/jobs/{id}/feedback`` with ``{"label": "..."}``: the answered job's true label
    (``Client.feedback``): 200 with what was recorded; 404 unknown (or another key's), 409 not
    answered, answered without a prediction, or given already; 400 a label the model lacks."""
    gw: Gateway = request.app.state.gateway
    owner = await gw.authorize(request)
    job_id = _job_id(request)
    label = await _feedback_label(request)
    await _known(gw, job_id, owner)
    try:
        recorded = await run_in_threadpool(gw.client.feedback, job_id, label)
    except BatcheryError as exc:
        raise refusal(exc) from exc
    return JSONResponse(recorded)


async def _feedback_label(request: Request) -> str:
    """The label in a feedback request's JSON body (400 or 415 if there is none)."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        raise HTTPException(415, 'send {"label": "..."} as application/json, not '
                            f"{kind[:60] or 'no Content-Type'}")  # fmt: skip
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, 'the body is not JSON: send {"label": "..."}') from None
    if not isinstance(body, dict) or "label" not in body:
        raise HTTPException(400, 'the body must be an object with a label: {"label": "..."}')
    if set(body) != {"label"}:
        extra = sorted(set(body) - {"label"})[0]
        raise HTTPException(400, f"unknown field {excerpt(extra)} (the one field: label)")
    try:
        return check_label(body["label"])
    except InvalidLabelError as exc:
        raise HTTPException(400, str(exc)) from exc


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: the registry, as ``batchery models list --json``, each version with
    the live worker processes that can serve it, by kind (``workers``: ``full``, ``lite``)."""
    gw: Gateway = request.app.state.gateway
    await gw.authorize(request)
    try:
        rows = await run_in_threadpool(Registry(gw.settings.model_dir).rows)
    except BatcheryError as exc:
        raise HTTPException(500, str(exc)) from exc
    # Which live workers can serve each version: TensorFlow ("full") workers every format,
    # lite ones LiteRT versions only (each heartbeat holds its worker's kind).
    keys = [key async for key in gw.redis.scan_iter(f"{HEARTBEAT_PREFIX}*", count=1000)]
    kinds = [k.decode() if isinstance(k, bytes) else k
             for k in (await gw.redis.mget(keys) if keys else []) if k]  # fmt: skip
    full, lite = sum(k != "lite" for k in kinds), sum(k == "lite" for k in kinds)
    for row in rows:
        row["workers"] = {"full": full, "lite": lite if row.get("format") == "litert" else 0}
    return JSONResponse(rows)


async def healthz(request: Request) -> Response:
    """``GET /healthz``: the process answers."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """``GET /readyz``: Redis answers and at least one worker process is alive."""
    gw: Gateway = request.app.state.gateway
    try:
        await gw.redis.ping()
        _, found = await gw.redis.scan(0, match=f"{HEARTBEAT_PREFIX}*", count=1000)
        if not found:
            found = [key async for key in gw.redis.scan_iter(f"{HEARTBEAT_PREFIX}*", count=1000)]
    except (redis.RedisError, OSError) as exc:
        return JSONResponse({"status": "unavailable", "error": f"Redis: {exc}"}, 503)
    if not found:
        return JSONResponse({"status": "unavailable", "error": "no worker is alive"}, 503)
    return JSONResponse({"status": "ready", "workers": len(found)})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text, with the backlog read from Redis now."""
    gw: Gateway = request.app.state.gateway
    queue = gw.settings.queue
    try:
        raw = await asyncio.wait_for(gw.redis.get(backlog_key(queue)), 2.0)
        gw.metrics.backlog.labels(queue).set(backlog_jobs(raw))
    except (redis.RedisError, OSError, asyncio.TimeoutError):
        with contextlib.suppress(KeyError):  # no stale figure for an autoscaler to act on
            gw.metrics.backlog.remove(queue)
    return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``."""
    gw: Gateway = request.app.state.gateway
    return JSONResponse(openapi.document(gw.settings, webhooks=gw.webhooks))


async def docs(request: Request) -> Response:
    """``GET /docs``: Swagger UI, served from this package (no CDN)."""
    return HTMLResponse(_DOCS)


#: The page runs only its own script and styles; images come from the page itself.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


async def index(request: Request) -> Response:
    """``GET /``: the web page."""
    return FileResponse(WEB / "index.html", headers=_PAGE_HEADERS)


_DOCS = """<!doctype html><html><head><meta charset="utf-8"><title>Batchery API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head><body><div id="ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script></body></html>"""


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}))


def create_app(settings: Settings, webhooks: bool = True) -> Any:
    """The gateway as an ASGI app (Starlette inside :class:`Guard`).

    ``webhooks``: run a webhook delivery consumer in this process (when
    BATCHERY_WEBHOOK_SECRET is set).
    """
    from swagger_ui_bundle import swagger_ui_path

    keys = ApiKeys.load(settings.api_keys) if settings.api_keys else None
    deliver = webhooks and settings.webhook_secret is not None
    gateway_metrics = GatewayMetrics()
    quality = QualityGauges(gateway_metrics.registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # HTTP callers are not kept waiting long: a full queue is a 429 at once, an
        # unreachable Redis a 503 after at most 2 s.
        client_settings = replace(settings, queue_wait_s=0.0,
                                  connect_retry_s=min(settings.connect_retry_s, 2.0))  # fmt: skip
        client = Client(settings=client_settings)
        r = connections.async_client(settings, max_connections=1024, socket_connect_timeout=2)
        waiter = ResultWaiter(r)
        limiter = RateLimiter(r, settings.api_rate, settings.api_burst) if keys else None
        app.state.gateway = Gateway(settings, client, r, keys, limiter, waiter,
                                    Outbox(r, settings), gateway_metrics, deliver)  # fmt: skip
        stop = asyncio.Event()
        task = None
        if deliver:
            outcome = gateway_metrics.webhooks.labels
            deliverer = Deliverer(settings, r, lambda kind: outcome(kind).inc())
            task = asyncio.create_task(deliverer.run(stop))
        # Model quality (drift, low confidence, live accuracy) for /metrics, read every 30 s
        # in a thread: gateway/quality.py.
        reading = None
        if settings.monitor:

            def read() -> list[VersionQuality]:
                quality.decisions = read_decisions(client.redis)
                return read_quality(client.redis, Registry.from_settings(settings), settings)

            reading = asyncio.create_task(refresh(quality, read, stop))
        try:
            yield
        finally:
            stop.set()
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5)
            if reading is not None:  # nothing to finish: a read in hand is left to its thread
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(reading, 1)
            await waiter.close()
            await r.aclose()
            client.close()

    routes = [
        Route("/", index),
        Route("/v1/jobs", submit, methods=["POST"]),
        Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/v1/jobs/{job_id}/feedback", give_feedback, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi_json),
        Route("/docs", docs),
        Mount("/docs/assets", StaticFiles(directory=swagger_ui_path), name="docs-assets"),
        Mount("/static", StaticFiles(directory=WEB), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})  # fmt: skip
    return Guard(app, settings, gateway_metrics)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the gateway to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    settings: Settings, host: str = "127.0.0.1", port: int = 8000, webhooks: bool = True,
    allow_unauthenticated: bool = False, log_level: str = "info",
    stop: threading.Event | None = None,
) -> None:  # fmt: skip
    """Run the gateway until interrupted: Ctrl-C (or ``stop`` set) shuts it down and returns.

    Without BATCHERY_API_KEYS anyone who can reach it may submit: it then binds a loopback
    address only, unless ``allow_unauthenticated`` (a container whose port is published on
    loopback, or behind your own authenticating proxy).
    """
    import uvicorn

    from producer.stopping import stop_on_signals

    if settings.api_keys is None and not is_loopback(host) and not allow_unauthenticated:
        raise ConfigError(
            f"refusing to serve on {host} without API keys: anyone who can reach it could "
            "submit. Set BATCHERY_API_KEYS (see batchery serve --new-key), bind 127.0.0.1, or "
            "pass --allow-unauthenticated if something in front of it authenticates"
        )
    app = create_app(settings, webhooks=webhooks)
    if settings.api_keys is None:
        print(f"batchery gateway: no BATCHERY_API_KEYS, so anyone who can reach {host}:{port} "
              f"may submit{' (loopback only)' if is_loopback(host) else ''}",
              flush=True)  # fmt: skip
    hooks = "webhooks on" if webhooks and settings.webhook_secret else "webhooks off"
    print(f"batchery gateway: http://{host}:{port} (Redis {redact_url(settings.redis_url)}, "
          f"{hooks}); the page at /, the API at /docs", flush=True)  # fmt: skip
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")  # fmt: skip
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            loop="auto", http=headers_in_time(settings.http_body_timeout_s),
                            timeout_keep_alive=5, timeout_graceful_shutdown=5)  # fmt: skip

    class Server(uvicorn.Server):
        """uvicorn's, which also stops once ``stop`` is set: by a Ctrl-C that came before
        uvicorn took the signal over, or one Python dropped in a finalizer (uvicorn's own
        handler only sets its flag, and re-raises the signal once it has shut down)."""

        async def on_tick(self, counter: int) -> bool:
            return (stop is not None and stop.is_set()) or await super().on_tick(counter)

    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(stop_on_signals(signal.SIGINT))
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn's re-raised Ctrl-C: it is done
            Server(config).run()
