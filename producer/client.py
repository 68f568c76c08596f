"""The producer's Python API: submit images as jobs, read their results. No TensorFlow here."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import redis

from producer import connections
from producer.connections import ReplicaAcks
from producer.errors import (
    BatcheryError,
    FeedbackError,
    FeedbackGivenError,
    InvalidImageError,
    InvalidLabelError,
    JobNotAnsweredError,
    JobNotFoundError,
    NoPredictionError,
    NoWorkerError,
    QueueFullError,
    RedisUnavailableError,
    ResultTimeoutError,
    WireError,
)
from producer.images import ImageInput, image_bytes
from producer.ledger import Ledger
from producer.registry import Registry
from producer.settings import Settings, redact_url
from producer.signing import Signer
from producer.waiting import Waiter
from producer.webhooks import WebhookPolicy
from producer.wire import (
    HEARTBEAT_PREFIX,
    JOB_KEY_PREFIX,
    PENDING,
    RESULT_KEY_PREFIX,
    STATS_KEY,
    SUCCESS,
    WEBHOOK_STREAM,
    Job,
    JobResult,
    build_message,
    check_callback_url,
    check_deadline,
    check_flag,
    check_job_id,
    check_name,
    check_priority,
    chunk_jobs,
    decode_result_meta,
    encode_job_record,
    encode_result_meta,
    excerpt,
    feedback_counts_key,
    feedback_key,
    job_key,
    lane_of_format,
    new_job_ids,
    pending_result,
    result_key,
)

#: Connections a client may open: one per thread for commands, one per waiting thread.
MAX_CONNECTIONS = 2048
#: Most bytes of messages one push carries. A single call over it is refused: Redis takes a
#: command of at most 512 MB, and cuts the connection on a bigger one (which reads like an
#: outage); and the producer would hold it all, twice, meanwhile.
MAX_PUSH_BYTES = 256 * 1024 * 1024
#: Seconds a client reuses a model version's lane, and the kinds of the workers alive.
LANE_CACHE_S = 2.0
#: Longest label feedback may carry (``Client.feedback``).
MAX_LABEL_CHARS = 128


class Client:
    """Submit classification jobs to Batchery and read their results.

    ``Client(url=None)``: ``url`` defaults to ``BATCHERY_REDIS_URL``. One Redis connection
    pool per client; a client is safe to share between threads.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        redis_client: redis.Redis | None = None,
    ) -> None:
        settings = settings or Settings.from_env()
        if url:
            settings = replace(settings, redis_url=url)
        self.settings = settings
        # Each thread waiting on a result holds a subscriber connection: room for many threads.
        self._redis = redis_client or connections.client(settings, max_connections=MAX_CONNECTIONS)
        self._signer = Signer.from_settings(settings)
        self._ledger = Ledger(self._redis, settings.queue, ReplicaAcks.from_settings(settings))
        self._cancel = self._redis.register_script(_CANCEL)
        self._feedback = self._redis.register_script(_FEEDBACK)
        self._outbox: list[_Ticket] = []
        self._pushing = False
        self._outbox_ready = threading.Condition()
        #: How this client waits for results (``producer.waiting``): shared by ``result``,
        #: ``results`` and ``classify``.
        self.waiter = Waiter(self)
        self._lanes: dict[tuple[str | None, str | None], tuple[str, float]] = {}
        self._kinds: set[str] = set()
        self._kinds_at = -LANE_CACHE_S

    def submit(
        self,
        image: ImageInput,
        model: str | None = None,
        version: str | None = None,
        *,
        priority: str = "normal",
        deadline_s: float | None = None,
        explain: bool = False,
        callback_url: str | None = None,
    ) -> str:
        """Enqueue one image; return its job id.

        ``image`` is a path, encoded bytes (PNG, JPEG, ...), a PIL image or a numpy array.
        ``model`` and ``version`` default to the workers' default model and its promoted
        version. ``priority`` is ``high``, ``normal`` or ``low``: workers take higher work
        first. ``deadline_s``: if its batch has not started that many seconds after now, the
        job is answered ``EXPIRED`` without being computed (BATCHERY_DEFAULT_DEADLINE_S when
        None). ``explain``: the result also carries an ``explanation``, an attribution map
        for the predicted class. ``callback_url``: see :meth:`submit_many`. Raises
        :class:`~producer.errors.InvalidImageError` before enqueueing anything if the input
        can't be sent.
        """
        return self.submit_many([image], model=model, version=version, priority=priority,
                                deadline_s=deadline_s, explain=explain,
                                callback_url=callback_url)[0]  # fmt: skip

    def submit_many(
        self,
        images: Iterable[ImageInput],
        model: str | None = None,
        version: str | None = None,
        *,
        priority: str = "normal",
        deadline_s: float | None = None,
        explain: bool = False,
        callback_url: str | None = None,
        owner: str | None = None,
    ) -> list[str]:
        """Enqueue many images in one round trip; return their job ids in input order.

        Every input is checked first: if one can't be sent, nothing is enqueued, and a call
        of more than 256 MiB of images is refused whole (``batchery classify`` streams any
        number of files). Jobs travel
        up to ``chunk_size`` to a message (fewer when their images pass
        BATCHERY_MAX_MESSAGE_BYTES together); each keeps its own id and its own result.
        ``priority``, ``deadline_s`` and ``explain`` as for :meth:`submit`.
        ``callback_url``: once answered, each job's result is POSTed there by a gateway's
        webhook delivery (see docs/http.md); refused unless BATCHERY_WEBHOOK_ALLOW allows it.
        ``owner``: the name recorded with the jobs (the gateway's API key name).
        """
        job = self.job_template(model, version, priority, deadline_s, explain=explain)
        record = self.job_record(callback_url, owner)
        limits = self.settings.max_image_bytes, self.settings.max_image_pixels
        data = [image_bytes(image, *limits) for image in images]
        ids = new_job_ids(len(data))
        self.enqueue([job.stamped(*pair) for pair in zip(ids, data, strict=True)],
                     dict.fromkeys(ids, record))  # fmt: skip
        return ids

    def job_record(self, callback_url: str | None = None, owner: str | None = None) -> str:
        """The record :meth:`enqueue` writes for a job (see ``wire.JOB_KEY_PREFIX``), checked:
        a callback URL this deployment may not call is refused here, before enqueueing."""
        check_name("owner", owner)
        if check_callback_url(callback_url) is not None:
            WebhookPolicy.from_settings(self.settings).check_url(str(callback_url))
        return encode_job_record(owner, callback_url)

    def job_template(
        self,
        model: str | None = None,
        version: str | None = None,
        priority: str = "normal",
        deadline_s: float | None = None,
        notify: bool = True,
        explain: bool = False,
    ) -> Job:
        """A job with these fields checked (and no image yet): what every submit starts from.

        Refuses, before anything is enqueued, what a worker would refuse.
        """
        self.check_model(model, version)
        lane = self.lane_of(model, version)
        deadline = check_deadline(deadline_s) or self.settings.default_deadline_s
        return Job("", b"", model, version, time.time(), notify, check_priority(priority),
                   deadline, check_flag("explain", explain), lane=lane)  # fmt: skip

    def lane_of(self, model: str | None, version: str | None) -> str:
        """The lane jobs for ``model@version`` travel in (``wire.LANES``): ``lite`` for a
        LiteRT version, which a worker without TensorFlow can serve, else the main lane. The
        main lane when the registry is not visible here (TensorFlow workers serve every
        format). Refuses, before enqueueing, a job no live worker can serve: workers are up
        and every one of them is lite. With no worker up (scaled to zero) jobs wait."""
        key = (model, version)
        now = time.monotonic()
        cached = self._lanes.get(key)
        if cached is not None and now - cached[1] < LANE_CACHE_S:
            lane = cached[0]
        else:
            registry = Registry(self.settings.model_dir)
            lane = ""
            try:
                if registry.names():
                    info = registry.get(model or self.settings.default_model, version)
                    lane = lane_of_format(info.format)
            except BatcheryError:
                pass  # unknown here: the main lane, where a worker answers with the reason
            if len(self._lanes) >= 1024:  # names a caller makes up must not grow it forever
                self._lanes.clear()
            self._lanes[key] = (lane, now)
        if lane == "" and self._only_lite_workers():
            name = model or self.settings.default_model
            raise NoWorkerError(
                f"no live worker can serve {name}@{version or 'promoted'} (not a LiteRT version): "
                "every worker up is a lite one; start a TensorFlow worker (batchery worker "
                "--kind full), or name a LiteRT version"
            )
        return lane

    def _only_lite_workers(self) -> bool:
        now = time.monotonic()
        if now - self._kinds_at >= LANE_CACHE_S:

            def read() -> list[Any]:
                keys = list(self._redis.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=1000))
                return self._redis.mget(keys) if keys else []

            kinds = self.retrying(read)
            # A worker from before kinds wrote "1": a TensorFlow one.
            self._kinds = {(k.decode() if isinstance(k, bytes) else str(k)) for k in kinds if k}
            self._kinds_at = now
        return bool(self._kinds) and self._kinds <= {"lite"}

    def cancel(self, job_id: str) -> bool:
        """Withdraw a job: True if it is now CANCELLED, False if it was already answered.

        A job not yet started is never computed: its result becomes ``{"status":
        "CANCELLED"}`` at once, and a worker reaching it skips it. One inside a chunk message
        is withdrawn alone. A job already answered keeps its answer. Batchery keeps no index
        of queued ids, so an id it never saw is cancelled too: it can never run afterwards.
        """
        return self.cancel_many([job_id])[0]

    def cancel_many(self, job_ids: Sequence[str]) -> list[bool]:
        """:meth:`cancel` for many jobs in one round trip; a flag per id, in order."""
        ids = [check_job_id(job_id) for job_id in job_ids]
        if not ids:
            return []
        metas = [encode_result_meta(JobResult.cancelled(job_id)) for job_id in ids]
        keys = [result_key(job_id) for job_id in ids]
        args: list[Any] = [self.settings.result_ttl_s, RESULT_KEY_PREFIX, JOB_KEY_PREFIX, *metas]

        def run() -> list[int]:
            return list(self._cancel(keys=[STATS_KEY, WEBHOOK_STREAM, *keys], args=args))

        return [bool(flag) for flag in self.retrying(run)]

    def feedback(self, job_id: str, label: str) -> dict[str, Any]:
        """Record ``label`` as the true label of an answered job: live accuracy per model
        version, and its confusion matrix, in ``batchery monitor``.

        Returns ``{"job_id", "model", "version", "label", "predicted", "correct"}``. One
        feedback a job, for as long as results are kept (BATCHERY_RESULT_TTL). Refused, and
        nothing recorded, with :class:`~producer.errors.JobNotFoundError` for an id Redis
        knows nothing of; :class:`~producer.errors.JobNotAnsweredError` for a job not
        answered yet; :class:`~producer.errors.NoPredictionError` for one answered FAILURE,
        EXPIRED or CANCELLED (no prediction to judge); :class:`~producer.errors.
        FeedbackGivenError` for a second feedback (the first stands);
        :class:`~producer.errors.InvalidLabelError` for a label that is not printable text of
        1 to :data:`MAX_LABEL_CHARS` characters, or not one of the version's labels.

        The label is checked against the model version's labels in the registry
        (BATCHERY_MODEL_DIR) when this host sees it. A host without the registry directory
        accepts any well-formed label, as :meth:`check_model` accepts any model name there:
        feedback often comes from a labelling tool far from the models, and a label the
        model does not have is still counted, as wrong, and shows as its own row of the
        confusion matrix rather than vanishing. The check, the one-feedback rule and the
        count are atomic: one script re-reads the result, SETs the job's feedback with NX
        and adds one to the version's counts (``wire.feedback_counts_key``).
        """
        job_id = check_job_id(job_id)
        label = check_label(label)
        rkey, jkey = result_key(job_id), job_key(job_id)

        def read() -> list[Any]:
            with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(rkey)
                pipe.exists(jkey)
                return pipe.execute()

        raw, known = self.retrying(read)
        if raw is None:
            raise _unanswered(job_id, bool(known))
        result = decode_result_meta(raw)
        status = result.get("status")
        if status == PENDING:
            raise _unanswered(job_id, True)
        if status != SUCCESS:
            raise _no_prediction(job_id, str(status), result.get("error"))
        model, version, predicted = result.get("model"), result.get("version"), result.get("label")
        if not (isinstance(model, str) and isinstance(version, str) and isinstance(predicted, str)):
            raise WireError(f"job {job_id}'s result names no model, version or label")
        registry = Registry(self.settings.model_dir)
        if registry.names():
            labels = registry.get(model, version).labels
            if label not in labels:
                shown = ", ".join(labels[:20]) + (", ..." if len(labels) > 20 else "")
                raise InvalidLabelError(
                    f"label {excerpt(label)} is not one of {model}@{version}'s labels "
                    f"({shown}): give the job's true class as the model names it"
                )
        keys = [rkey, jkey, feedback_key(job_id), feedback_counts_key(model, version)]
        field = f"{label}\t{predicted}"
        args: list[Any] = [self.settings.result_ttl_s, label, field, model, version, predicted]
        # Not retried: a second run after a lost reply would read the first as "given".
        with self._redis_errors():
            code, detail = self._feedback(keys=keys, args=args)
        code = code.decode() if isinstance(code, bytes) else str(code)
        detail = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
        if code == "unknown":
            raise _unanswered(job_id, False)
        if code == "unanswered":
            raise _unanswered(job_id, True)
        if code == "status":
            raise _no_prediction(job_id, detail, None)
        if code == "given":
            raise FeedbackGivenError(
                f"job {job_id} already has its feedback (label {excerpt(detail)}); one feedback "
                "a job, and the first stands"
            )
        if code != "ok":  # its result changed between the two reads: it expired and came back
            raise FeedbackError(f"job {job_id}'s result changed while its feedback was "
                                "recorded; nothing was counted: give it again")  # fmt: skip
        return {"job_id": job_id, "model": model, "version": version, "label": label,
                "predicted": predicted, "correct": label == predicted}  # fmt: skip

    def enqueue(self, jobs: Sequence[Job], records: Mapping[str, str] | None = None) -> None:
        """Push already checked jobs, ``chunk_size`` to a message, in one LPUSH (all or none).

        ``records``: job id -> its record (:meth:`job_record`), written in the same script,
        before any worker can see the job. Bulk runs send none.

        Group commit: while one thread's push is on the wire, jobs other threads enqueue wait
        and then leave together in the next push, packed into shared messages. Many
        concurrent submitters cost the queue a few messages instead of one each; a lone
        submitter pushes at once.
        """
        if not jobs:
            return
        size = sum(job.wire_size() for job in jobs)
        if size > MAX_PUSH_BYTES:
            raise InvalidImageError(
                f"{len(jobs)} images make {size >> 20} MiB in one call, over the "
                f"{MAX_PUSH_BYTES >> 20} MiB one push may carry: submit fewer at a time "
                "(batchery classify streams any number); nothing was enqueued"
            )
        ticket = _Ticket(list(jobs), dict(records or {}), size)
        with self._outbox_ready:
            self._outbox.append(ticket)
            while not ticket.sent:
                if not self._pushing:
                    self._pushing = True
                    batch, self._outbox = self._outbox, []
                    break
                self._outbox_ready.wait()
            else:
                if ticket.error is not None:
                    raise ticket.error
                return
        # Calls that arrived together leave together, a push of at most MAX_PUSH_BYTES at a
        # time: each call is whole in one push (all or none).
        groups: list[list[_Ticket]] = [[]]
        for t in batch:
            if groups[-1] and sum(g.size for g in groups[-1]) + t.size > MAX_PUSH_BYTES:
                groups.append([])
            groups[-1].append(t)
        error: BaseException | None = None
        for group in groups:
            try:
                if error is None:
                    records = {jid: rec for t in group for jid, rec in t.records.items()}
                    self._push([job for t in group for job in t.jobs], records)
            except BaseException as exc:
                error = exc
            for t in group:
                t.error = error
        with self._outbox_ready:
            for t in batch:
                t.sent = True
            self._pushing = False
            self._outbox_ready.notify_all()
        if ticket.error is not None:
            raise ticket.error

    def _push(self, jobs: list[Job], records: dict[str, str]) -> None:
        settings = self.settings
        queue = settings.queue
        messages = [
            build_message(chunk, queue, signer=self._signer)
            for chunk in chunk_jobs(jobs, settings.chunk_size, settings.max_message_bytes)
        ]
        limit = settings.max_queue

        def push() -> int:
            return self._ledger.push(messages, settings.visibility_timeout_s, limit, records,
                                     settings.result_ttl_s)  # fmt: skip

        # One atomic script: all messages or none, recorded in the ledger. A bounded queue
        # that is full waits (bounded) for workers to drain it.
        deadline = time.monotonic() + self.settings.queue_wait_s
        while self.retrying(push) < 0:
            if time.monotonic() >= deadline:
                raise QueueFullError(
                    f"queue {queue!r} is full (BATCHERY_MAX_QUEUE={limit} messages) and did not "
                    f"drain within {self.settings.queue_wait_s:g} s (BATCHERY_QUEUE_WAIT); "
                    "nothing was enqueued"
                )
            time.sleep(0.05)

    def fetch(
        self, job_ids: Sequence[str], forget: Sequence[str] = ()
    ) -> dict[str, dict[str, Any]]:
        """The results stored so far for ``job_ids`` (one MGET, no waiting).

        ``forget``: result keys to delete in the same round trip (jobs already collected).
        """
        if not job_ids and not forget:
            return {}

        def round_trip() -> list[Any]:
            with self._redis.pipeline(transaction=False) as pipe:
                if forget:
                    pipe.unlink(*(result_key(j) for j in forget))
                if job_ids:
                    pipe.mget([result_key(j) for j in job_ids])
                return pipe.execute()

        replies = self.retrying(round_trip)
        if not job_ids:
            return {}
        return {
            jid: decode_result_meta(raw)
            for jid, raw in zip(job_ids, replies[-1], strict=True)
            if raw is not None
        }

    def check_model(self, model: str | None, version: str | None) -> None:
        """Refuse a model or version name that isn't one, or (when the registry is visible) an
        unknown model or version, before enqueueing.

        A producer on a host without the registry directory skips the second check; the
        worker then answers such jobs with the same error.
        """
        check_name("model", model)
        check_name("version", version)
        if model is None and version is None:
            return
        registry = Registry(self.settings.model_dir)
        if registry.names():
            registry.get(model or self.settings.default_model, version)

    def result(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """A job's result dict (see the README).

        With ``timeout`` None or 0, return at once: a job not answered yet comes back with
        status ``PENDING``. With a timeout, wait up to that many seconds for the answer and
        raise :class:`~producer.errors.ResultTimeoutError` if it does not come.
        """
        key = result_key(job_id)
        raw = self.retrying(lambda: self._redis.get(key))
        if raw is None and not timeout:
            return pending_result(job_id)
        if raw is None and timeout:
            raw = self.waiter.one(job_id, time.monotonic() + timeout)
        if raw is None:
            raise ResultTimeoutError(f"job {job_id} has no result after {timeout:g} s")
        return decode_result_meta(raw)

    def results(self, job_ids: Sequence[str], timeout: float | None = None) -> list[dict[str, Any]]:
        """Many jobs' results in input order, read with MGET.

        Waits up to ``timeout`` seconds for all of them; jobs still unanswered then come back
        with status ``PENDING`` (this call does not raise on timeout).
        """
        found = self.waiter.many(job_ids, time.monotonic() + (timeout or 0.0))
        return [found.get(jid) or pending_result(jid) for jid in job_ids]

    @property
    def redis(self) -> redis.Redis:
        """The client's Redis connection (for status and tools)."""
        return self._redis

    def close(self) -> None:
        """Release the Redis connections."""
        self.waiter.close()
        self._redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def retrying(self, call: Callable[[], T]) -> T:
        """``call()``, retried while Redis can't be reached, for up to BATCHERY_CONNECT_RETRY s."""
        deadline = time.monotonic() + self.settings.connect_retry_s
        pause = 0.05
        while True:
            try:
                with self._redis_errors():
                    return call()
            except RedisUnavailableError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, 1.0)

    @contextmanager
    def _redis_errors(self) -> Iterator[None]:
        """Redis's errors as Batchery's, naming the URL without its password."""
        url = redact_url(self.settings.redis_url)
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise RedisUnavailableError(
                f"cannot reach Redis at {url} (retried for {self.settings.connect_retry_s:g} s, "
                f"BATCHERY_CONNECT_RETRY): {exc}"
            ) from exc
        except redis.ResponseError as exc:
            if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM" in str(exc):
                raise QueueFullError(
                    f"Redis at {url} is out of memory (maxmemory with noeviction) and refused "
                    "the write: nothing was enqueued"
                ) from exc
            raise


def check_label(value: Any) -> str:
    """``value`` if it can be a feedback label: printable text (no tab, no newline) of 1 to
    :data:`MAX_LABEL_CHARS` characters; :class:`~producer.errors.InvalidLabelError` if not."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_LABEL_CHARS:
        raise InvalidLabelError(
            f"label {excerpt(value)} is not a label: text of 1 to {MAX_LABEL_CHARS} characters"
        )
    if not value.isprintable():
        raise InvalidLabelError(
            f"label {excerpt(value)} holds a tab, a newline or another "
            "control character: give the class's name as the model has it"
        )
    return value


def _unanswered(job_id: str, known: bool) -> BatcheryError:
    if not known:
        return JobNotFoundError(
            f"no job {job_id}: never submitted, or its result expired (BATCHERY_RESULT_TTL)"
        )
    return JobNotAnsweredError(
        f"job {job_id} is not answered yet: give its feedback once it has a result"
    )


def _no_prediction(job_id: str, status: str, error: Any) -> NoPredictionError:
    why = f": {error}" if isinstance(error, str) and error else ""
    return NoPredictionError(
        f"job {job_id} was answered {status}{why}; it has no prediction to give feedback on"
    )


T = TypeVar("T")

# KEYS: the stats hash, the webhook stream, then a result key per job. ARGV: ttl, the result
# and job key prefixes, then the CANCELLED meta per job. A job with no result gets CANCELLED
# (published to anyone waiting, and to its callback if it has one); one with a result keeps
# it. Returns a 1 (cancelled) or 0 (already answered) per job.
_CANCEL = """
local flags, n = {}, 0
for i = 3, #KEYS do
  local meta = ARGV[i + 1]
  if redis.call('SET', KEYS[i], meta, 'EX', tonumber(ARGV[1]), 'NX') then
    redis.call('PUBLISH', KEYS[i], meta)
    local id = string.sub(KEYS[i], #ARGV[2] + 1)
    local record = redis.call('GET', ARGV[3] .. id)
    local tab = record and string.find(record, '\t', 1, true)
    if tab and tab < #record then
      redis.call('XADD', KEYS[2], '*', 'job', id, 'url', string.sub(record, tab + 1))
    end
    flags[i - 2] = 1
    n = n + 1
  else
    flags[i - 2] = 0
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[1], 'cancelled', n) end
return flags
"""


# KEYS: the job's result, its record, its feedback, its version's feedback counts. ARGV: the
# feedback's TTL, the true label, the counts field ("<true>\t<predicted>"), and the model,
# version and predicted label the caller read in the result. Re-reads the result, so what
# is counted is what is stored now: {"ok", ""}, or a refusal: {"unknown", ""} (no result,
# no record), {"unanswered", ""}, {"status", <status>} (no SUCCESS), {"given", <the label
# already given>}, {"changed", ""} (not the result the caller read).
_FEEDBACK = """
local raw = redis.call('GET', KEYS[1])
if not raw then
  if redis.call('EXISTS', KEYS[2]) == 1 then return {'unanswered', ''} end
  return {'unknown', ''}
end
local ok, meta = pcall(cjson.decode, raw)
local result = ok and type(meta) == 'table' and meta['result']
if type(result) ~= 'table' then return {'changed', ''} end
local status = result['status'] or meta['status']
if status == 'PENDING' then return {'unanswered', ''} end
if status ~= 'SUCCESS' then return {'status', tostring(status)} end
if result['model'] ~= ARGV[4] or result['version'] ~= ARGV[5] or result['label'] ~= ARGV[6] then
  return {'changed', ''}
end
if not redis.call('SET', KEYS[3], ARGV[2], 'EX', tonumber(ARGV[1]), 'NX') then
  return {'given', redis.call('GET', KEYS[3]) or ''}
end
redis.call('HINCRBY', KEYS[4], ARGV[3], 1)
return {'ok', ''}
"""


class _Ticket:
    """Jobs waiting in a client's outbox for a group push."""

    __slots__ = ("error", "jobs", "records", "sent", "size")

    def __init__(self, jobs: list[Job], records: dict[str, str], size: int) -> None:
        self.jobs = jobs
        self.records = records
        self.size = size
        self.sent = False
        self.error: BaseException | None = None
