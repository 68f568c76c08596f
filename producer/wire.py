"""What producers and workers agree on: task and key names, the job, the message, the result.

Only this module knows how a message or a result looks on the wire. Everything is JSON.

A message carries 1..N jobs; a job is always one image with its own id and its own result.
Messages are Celery protocol-2 task messages in kombu's Redis envelope, so a stock Celery
worker consumes them; results are Celery result metas at ``celery-task-meta-<job_id>``, so a
stock Celery client's ``AsyncResult(job_id).get()`` reads them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import orjson

from producer.errors import InvalidJobError, WireError


def _plain(value: Any) -> Any:
    """orjson's fallback: a NumPy scalar as the Python number it holds."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps_json(value: Any) -> str:
    """JSON text for the wire (messages, result metas). orjson: a third of the standard
    library's time or less (a 256-job message, which a bulk run encodes on every push, and a
    result meta); the text is compact, UTF-8 rather than \\u escapes, the same JSON to every
    reader."""
    try:
        return orjson.dumps(value, default=_plain).decode()
    except orjson.JSONEncodeError:
        # A str orjson refuses (a lone surrogate: a file name that is not UTF-8, which
        # os.walk hands over so): the standard library escapes it, as it always did, and the
        # job fails alone where it is checked, not the whole push.
        return json.dumps(value, default=_plain)


def loads_json(raw: bytes | str) -> Any:
    """Parse JSON text from the wire (orjson, as :func:`dumps_json`); ``ValueError`` if it
    is not JSON."""
    return orjson.loads(raw)


#: The Celery task every message is addressed to.
TASK_CLASSIFY = "batchery.classify"

#: Celery's own result key prefix: results live where a plain Celery client looks for them.
RESULT_KEY_PREFIX = "celery-task-meta-"

#: Worker counters (a Redis hash): jobs done, jobs failed, batches run, last batch time,
#: jobs computed again after they were answered (``computed_twice``: their second answer was
#: discarded), and jobs refused without an id to answer them by (``refused``).
STATS_KEY = "batchery:stats"

#: Jobs that killed their worker too often, one JSON object each (never the image).
DEAD_LETTER_KEY = "batchery:dead"

#: kombu's Redis transport keeps delivered, unacknowledged messages in this hash.
UNACKED_KEY = "unacked"


def ledger_key(queue: str) -> str:
    """Every message Batchery pushed on ``queue``, until a worker answered its jobs (see
    ledger.py): message id -> "<delivery tag> <pushed at> <raw envelope>"."""
    return f"batchery:ledger:{queue}"


def ledger_due_key(queue: str) -> str:
    """Message id -> when to check on it, for ``queue``'s ledger."""
    return f"batchery:ledger:{queue}:due"


def ledger_jobs_key(queue: str) -> str:
    """Message id -> how many jobs it carries, for ``queue``'s ledger (see :func:`backlog_key`)."""
    return f"batchery:ledger:{queue}:jobs"


def backlog_key(queue: str) -> str:
    """Jobs pushed on ``queue`` and not answered yet, wherever they are: waiting in Redis,
    buffered in a worker, running. Kept by the ledger's scripts; the autoscaling signal."""
    return f"batchery:backlog:{queue}"


def ledger_lock_key(queue: str) -> str:
    """Held for a moment by the one worker process sweeping ``queue``'s ledger."""
    return f"batchery:ledger:{queue}:sweeping"


SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
PENDING = "PENDING"
#: Withdrawn by ``Client.cancel`` before it was computed.
CANCELLED = "CANCELLED"
#: Its ``deadline_s`` passed before its batch started: never computed.
EXPIRED = "EXPIRED"

#: Job priorities, highest first, and the kombu priority of each one's Redis list. Normal is
#: kombu's 0, the bare queue, where a stock Celery producer's messages land too; high and
#: low are the lists kombu names ``<queue>\x06\x163`` and ``<queue>\x06\x166`` (kombu's 9,
#: which only a stock producer would use, is served as low).
PRIORITIES = {"high": 3, "normal": 0, "low": 6}
#: kombu's separator between a queue's name and its priority.
PRIORITY_SEP = "\x06\x16"
#: Longest deadline a job may carry, in seconds (30 days).
MAX_DEADLINE_S = 30 * 24 * 3600.0


#: A queue's lanes: jobs a worker without TensorFlow can serve (LiteRT versions) travel in
#: the ``lite`` lane, every other job in the main one. A lane is a kombu queue of its own
#: (``<queue>.lite``), so kombu's own redelivery puts a message back in its lane; both share
#: the queue's ledger and backlog. TensorFlow workers take both lanes, lite workers only
#: theirs: a Keras job never reaches a worker that can't serve it.
LANES = ("", "lite")


def lane_queue(queue: str, lane: str = "") -> str:
    """The kombu queue of ``queue``'s ``lane``."""
    return f"{queue}.{lane}" if lane else queue


def lane_of_format(fmt: str) -> str:
    """The lane of a model format (a manifest's ``format``)."""
    return "lite" if fmt == "litert" else ""


def queue_key(queue: str, priority: str, lane: str = "") -> str:
    """The Redis list holding ``queue``'s messages of ``priority`` in ``lane``."""
    number = PRIORITIES[priority]
    name = lane_queue(queue, lane)
    return f"{name}{PRIORITY_SEP}{number}" if number else name


def queue_keys(queue: str) -> list[str]:
    """Every list of ``queue``: each lane's, each priority's (the ledger's order)."""
    return [queue_key(queue, priority, lane) for lane in LANES for priority in PRIORITIES]


def priority_of(number: Any) -> str:
    """The priority a kombu priority number is served at (0-2 normal, 3-5 high, else low)."""
    if not isinstance(number, int) or isinstance(number, bool) or number < 3:
        return "normal"
    return "high" if number < 6 else "low"


def result_key(job_id: str) -> str:
    """The Redis key holding a job's result."""
    return f"{RESULT_KEY_PREFIX}{job_id}"


def deaths_key(job_id: str) -> str:
    """How many worker processes died while holding this job."""
    return f"batchery:deaths:{job_id}"


def heartbeat_key(worker: str) -> str:
    """Present (with a short expiry) while a worker process is alive."""
    return f"{HEARTBEAT_PREFIX}{worker}"


HEARTBEAT_PREFIX = "batchery:worker:"

#: A job's record, written by ``Client.submit_many`` (and the gateway) in the script that
#: pushes its message, expiring with the results: ``<owner>\t<callback>``, the API key's
#: name that sent it and the URL its result is POSTed to, either empty. It tells a known job
#: from an unknown id before it is answered. Neither part can hold a tab (names and URLs are
#: checked), so the worker's script finds the callback without a parser.
JOB_KEY_PREFIX = "batchery:job:"

#: Webhook deliveries due (a Redis stream of ``job``, ``url`` entries, added by the script
#: that stores the job's result), read by the gateways' consumer group.
WEBHOOK_STREAM = "batchery:webhooks"
WEBHOOK_GROUP = "gateways"
#: The last deliveries given up on (a capped list of JSON objects).
WEBHOOK_FAILED_KEY = "batchery:webhooks:failed"


def job_key(job_id: str) -> str:
    """The Redis hash recording a submitted job (see :data:`JOB_KEY_PREFIX`)."""
    return f"{JOB_KEY_PREFIX}{job_id}"


def encode_job_record(owner: str | None = None, callback: str | None = None) -> str:
    """A job's record (see :data:`JOB_KEY_PREFIX`); its parts already checked."""
    return f"{owner or ''}\t{callback or ''}"


def decode_job_record(raw: bytes | str | None) -> tuple[str | None, str | None]:
    """The owner and callback of a stored job record (None for what it does not say)."""
    if raw is None:
        return None, None
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    owner, _, callback = text.partition("\t")
    return owner or None, callback or None


def rate_key(owner: str) -> str:
    """An API key's rate limiter state (its theoretical arrival time, in ms)."""
    return f"batchery:rate:{owner}"


#: Model quality in production (``producer.monitoring``): what a model version's answers and
#: inputs looked like, one hash a minute a version (counts of classes, score bins, pixel
#: statistics, input sizes and formats), written by workers in a batch's result pipeline
#: and summed by readers; a version's baseline when its manifest has none (its first live
#: window, JSON); a job's true label (``Client.feedback``); a version's feedback counts
#: (``<true>\t<predicted>`` -> jobs).
MONITOR_KEY_PREFIX = "batchery:monitor:"
MONITOR_BUCKET_S = 60
MONITOR_TTL_S = 2 * 3600
FEEDBACK_KEY_PREFIX = "batchery:feedback:"


def monitor_key(model: str, version: str, minute: int) -> str:
    """One minute's monitoring counts for ``model@version`` (``minute``: epoch s // 60)."""
    return f"{MONITOR_KEY_PREFIX}{model}@{version}:{minute}"


def live_baseline_key(model: str, version: str) -> str:
    """The baseline taken from ``model@version``'s first live window (no manifest baseline)."""
    return f"{MONITOR_KEY_PREFIX}baseline:{model}@{version}"


def rollout_stopped_key(model: str) -> str:
    """The canary version of ``model`` that must no longer answer (unsigned: it can only send
    jobs back to the signed served version; see producer.rollout)."""
    return f"batchery:rollout:stopped:{model}"


def rollout_start_key(model: str) -> str:
    """The canary version's monitoring counts when its canary started (JSON), taken off
    what its guardrails judge: counts of the same minutes from before (a shadow, jobs that
    named it) are not the canary's."""
    return f"batchery:rollout:start:{model}"


def rollout_history_key(model: str) -> str:
    """``model``'s rollout decisions, newest first (a capped list of JSON objects)."""
    return f"batchery:rollout:history:{model}"


def feedback_key(job_id: str) -> str:
    """A job's true label, as its feedback gave it (one feedback a job)."""
    return f"{FEEDBACK_KEY_PREFIX}{job_id}"


def feedback_counts_key(model: str, version: str) -> str:
    """``model@version``'s feedback: ``<true label>\t<predicted label>`` -> jobs."""
    return f"{FEEDBACK_KEY_PREFIX}counts:{model}@{version}"


#: A message's header saying how many jobs it carries (workers prefetch by jobs, not messages).
JOBS_HEADER = "batchery_jobs"


def new_job_id() -> str:
    """A fresh job id (a UUID4, as Celery's task ids are)."""
    return str(uuid.uuid4())


_VERSION_4 = bytes(b & 0x0F | 0x40 for b in range(256))
_VARIANT_RFC_4122 = bytes(b & 0x3F | 0x80 for b in range(256))


def new_job_ids(count: int) -> list[str]:
    """``count`` fresh job ids, UUID4s as :func:`new_job_id` makes them, from one read of the
    system's randomness (a quarter of the cost of ``uuid4`` each)."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION_4)
    raw[8::16] = raw[8::16].translate(_VARIANT_RFC_4122)
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-{h[i + 12 : i + 16]}-{h[i + 16 : i + 20]}-"
        f"{h[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


#: Model and version names: letters, digits, ``.``, ``_``, ``-``; at most 64 characters; not
#: starting with ``.`` or ``-`` (so never a hidden file, a parent folder or a flag).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
#: A job id: printable text of at most this many characters (Batchery's are UUID4s).
MAX_JOB_ID_CHARS = 128
#: Most jobs one message may carry; a message with more is refused whole.
MAX_JOBS_PER_MESSAGE = 1024
#: ``submitted_at`` outside this window (2000-01-01 to 2100-01-01) is ignored, not trusted.
PLAUSIBLE_TIMES = (946_684_800.0, 4_102_444_800.0)
#: Error texts stored in results are cut to this many characters.
MAX_ERROR_CHARS = 300


def excerpt(value: Any, limit: int = 40) -> str:
    """A short, escaped excerpt of something an outsider sent: safe in an error or a log line.

    Control and non-ASCII characters come out as escapes, so no excerpt can start a new log
    line or hide text; anything longer than ``limit`` characters is cut and says how long.
    """
    if not isinstance(value, str):
        return f"a {type(value).__name__}"
    cut = value[:limit].encode("unicode_escape").decode("ascii").replace("'", "\\'")
    more = f"... ({len(value)} characters)" if len(value) > limit else ""
    return f"'{cut}'{more}"


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` with control characters escaped, cut to ``limit`` characters."""
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_name(kind: str, value: Any) -> str | None:
    """``value`` if it is a valid model or version name, or None; else :class:`InvalidJobError`."""
    if value is None:
        return None
    if not isinstance(value, str) or NAME_PATTERN.fullmatch(value) is None:
        raise InvalidJobError(
            f"{kind} {excerpt(value)} is not a name: use letters, digits, '.', '_' and '-', "
            "at most 64 characters, not starting with '.' or '-'"
        )
    return value


def check_job_id(value: Any) -> str:
    """``value`` if it is a valid job id; :class:`InvalidJobError` if not."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_JOB_ID_CHARS
        or not value.isprintable()
    ):
        raise InvalidJobError(
            f"job id {excerpt(value)} is not an id: printable text of 1 to "
            f"{MAX_JOB_ID_CHARS} characters"
        )
    return value


def check_priority(value: Any) -> str:
    """``value`` if it is a priority; :class:`InvalidJobError` if not."""
    if not isinstance(value, str) or value not in PRIORITIES:
        raise InvalidJobError(f"priority {excerpt(value)} is not one of {', '.join(PRIORITIES)}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is true or false; :class:`InvalidJobError` if not."""
    if not isinstance(value, bool):
        raise InvalidJobError(f"{name} must be true or false, got {excerpt(value)}")
    return value


def check_deadline(value: Any) -> float | None:
    """``value`` as seconds if it is a deadline (or None); :class:`InvalidJobError` if not."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidJobError(f"deadline_s {excerpt(value)} is not a number of seconds")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_DEADLINE_S):
        raise InvalidJobError(
            f"deadline_s must be above 0 and at most {MAX_DEADLINE_S:g} seconds (30 days)"
        )
    return seconds


#: Longest file path a job may carry.
MAX_PATH_CHARS = 4096


def check_shared_path(value: Any) -> str:
    """A ``path`` job's file: absolute, printable, at most :data:`MAX_PATH_CHARS`, without
    ``.`` or ``..`` parts. Whether a worker may read it is the worker's question
    (``images.read_shared``)."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidJobError(f"path must be an absolute path, got {excerpt(value)}")
    if len(value) > MAX_PATH_CHARS:
        raise InvalidJobError(f"path is over {MAX_PATH_CHARS} characters")
    if not value.isprintable():
        raise InvalidJobError(f"path {excerpt(value)} holds control characters")
    if any(part in (".", "..") for part in value.split("/")):
        raise InvalidJobError(f"path {excerpt(value)} has . or .. parts")
    return value


#: Longest callback URL a job may carry.
MAX_URL_CHARS = 2048


def check_callback_url(value: Any) -> str | None:
    """A callback URL's form: None, or ``http(s)://host[:port]/...`` with no user or password,
    no whitespace or control characters, at most :data:`MAX_URL_CHARS` characters.

    Whether this deployment may call it is the webhook policy's question (webhooks.py).
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidJobError(f"callback_url must be a URL, got {excerpt(value)}")
    if len(value) > MAX_URL_CHARS:
        raise InvalidJobError(f"callback_url is over {MAX_URL_CHARS} characters")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise InvalidJobError("callback_url holds whitespace or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise InvalidJobError(f"callback_url {excerpt(value)} is not a URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidJobError(f"callback_url {excerpt(value)} is not an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidJobError("callback_url must not carry a user name or password")
    if port == 0:
        raise InvalidJobError("callback_url has port 0")
    return value


def plausible_time(value: Any) -> float:
    """``value`` as a Unix time if it is a finite number in :data:`PLAUSIBLE_TIMES`, else 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        seconds = float(value)
    except OverflowError:
        return 0.0
    low, high = PLAUSIBLE_TIMES
    return seconds if math.isfinite(seconds) and low <= seconds <= high else 0.0


def base64_limit(max_bytes: int) -> int:
    """The longest base64 text that can decode to at most ``max_bytes`` bytes."""
    return 4 * -(-max_bytes // 3)


@dataclass(frozen=True)
class Job:
    """One image to classify, with its own id and its own result."""

    id: str
    image: bytes
    model: str | None = None
    version: str | None = None
    submitted_at: float = 0.0
    #: Publish the result on its key's channel (waiting clients wake at once). Bulk runs,
    #: which collect with MGET, turn it off: half the Redis writes per job.
    notify: bool = True
    #: ``high``, ``normal`` or ``low`` (see :data:`PRIORITIES`).
    priority: str = "normal"
    #: Seconds from ``submitted_at`` after which the job is answered EXPIRED if its batch has
    #: not started; None: no deadline.
    deadline_s: float | None = None
    #: Answer with an attribution map for the predicted class too (see worker.explain).
    explain: bool = False
    #: Instead of ``image``: a file the worker reads itself, under its BATCHERY_SHARED_ROOTS
    #: (``classify --shared-fs``, where workers see the producer's files).
    path: str | None = None
    #: Not sent: the size of the file a shrunk or path job stands for. Messages are cut by it
    #: too, so a message never stands for more than BATCHERY_MAX_MESSAGE_BYTES of photos and
    #: the work spreads over every pool process (workers merge small messages into batches).
    source_bytes: int = 0
    #: Not sent: the lane its message travels in (see :data:`LANES`), from its model's format.
    lane: str = ""

    def stamped(
        self, job_id: str, image: bytes = b"", submitted_at: float | None = None,
        path: str | None = None, source_bytes: int = 0,
    ) -> Job:  # fmt: skip
        """This job (a template, :meth:`Client.job_template`) for one input, with its own id:
        ``dataclasses.replace`` of those fields, at a third of its cost (bulk runs make one
        per file)."""
        return Job(job_id, image, self.model, self.version,
                   self.submitted_at if submitted_at is None else submitted_at, self.notify,
                   self.priority, self.deadline_s, self.explain, path, source_bytes,
                   self.lane)  # fmt: skip

    def to_wire(self) -> dict[str, Any]:
        """The job as a JSON-ready dict (image bytes in base64)."""
        wire: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "submitted_at": self.submitted_at,
        }
        if self.path is not None:
            wire["path"] = self.path
        else:
            wire["image"] = base64.b64encode(self.image).decode("ascii")
        if not self.notify:
            wire["notify"] = False
        if self.priority != "normal":
            wire["priority"] = self.priority
        if self.deadline_s is not None:
            wire["deadline_s"] = self.deadline_s
        if self.explain:
            wire["explain"] = True
        return wire

    def expired(self, now: float) -> bool:
        """Whether its deadline has passed at ``now`` (never, without a deadline or a time)."""
        return (
            self.deadline_s is not None
            and self.submitted_at > 0
            and now > self.submitted_at + self.deadline_s
        )

    def wire_size(self) -> int:
        """Roughly the bytes this job takes in a message (its image in base64, plus fields)."""
        return base64_limit(len(self.image)) + len(self.path or "") + 200

    @classmethod
    def from_wire(cls, obj: Any, max_image_bytes: int = 1 << 62) -> Job:
        """Rebuild a job from :meth:`to_wire`'s dict, checking every field.

        :class:`InvalidJobError` (a :class:`WireError`) names the field at fault; its
        ``job_id`` is the job's id when that much was valid, so the job can be failed.
        """
        if not isinstance(obj, dict):
            raise InvalidJobError(f"a job must be an object, got {excerpt(obj)}")
        job_id = check_job_id(obj.get("id"))
        try:
            model = check_name("model", obj.get("model"))
            version = check_name("version", obj.get("version"))
            path = obj.get("path")
            if path is not None and obj.get("image") is not None:
                raise InvalidJobError("a job carries an image or a path, not both")
            image = "" if path is not None else obj.get("image")
            if not isinstance(image, str):
                raise InvalidJobError(f"image must be base64 text, got {excerpt(image)}")
            # Checked before decoding: a huge field costs nothing more than its reading.
            if len(image) > base64_limit(max_image_bytes):
                raise InvalidJobError(
                    f"image of about {len(image) * 3 // 4} bytes is over the limit of "
                    f"{max_image_bytes} bytes (BATCHERY_MAX_IMAGE_BYTES)"
                )
            try:
                data = base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise InvalidJobError("image is not valid base64") from exc
            notify = obj.get("notify", True)
            return cls(
                id=job_id,
                image=data,
                model=model,
                version=version,
                submitted_at=plausible_time(obj.get("submitted_at")),
                notify=notify is not False,
                priority=check_priority(obj.get("priority", "normal")),
                deadline_s=check_deadline(obj.get("deadline_s")),
                explain=check_flag("explain", obj.get("explain", False)),
                path=None if path is None else check_shared_path(path),
            )
        except InvalidJobError as exc:
            exc.job_id = job_id
            raise


class Refusal(NamedTuple):
    """A job a worker will not run: its id (None when even that was not valid) and why."""

    job_id: str | None
    reason: str


def read_jobs(kwargs: Any, max_image_bytes: int = 1 << 62) -> tuple[list[Job], list[Refusal]]:
    """The valid jobs in a message's kwargs, and a refusal for each invalid one.

    A bad field refuses its own job only. A message with more than
    :data:`MAX_JOBS_PER_MESSAGE` jobs is refused whole (each job it names, failed).
    :class:`WireError` if the kwargs are not a jobs envelope at all.
    """
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("jobs"), list):
        raise WireError("message kwargs must be an object with a 'jobs' list")
    items = kwargs["jobs"]
    if len(items) > MAX_JOBS_PER_MESSAGE:
        reason = f"the message carries {len(items)} jobs, over the limit of {MAX_JOBS_PER_MESSAGE}"
        return [], [Refusal(jid, reason) for jid in job_ids_in(kwargs)]
    jobs: list[Job] = []
    refused: list[Refusal] = []
    for item in items:
        try:
            jobs.append(Job.from_wire(item, max_image_bytes))
        except InvalidJobError as exc:
            refused.append(Refusal(getattr(exc, "job_id", None), f"invalid job: {exc}"))
    return jobs, refused


def jobs_to_kwargs(jobs: list[Job], alone: bool = False) -> dict[str, Any]:
    """The Celery task kwargs carrying these jobs; ``alone``: run them in a batch of their own."""
    kwargs: dict[str, Any] = {"jobs": [job.to_wire() for job in jobs]}
    if alone:
        kwargs["alone"] = True
    return kwargs


def runs_alone(kwargs: Any) -> bool:
    """Whether a message must make a batch by itself (a job suspected of killing workers)."""
    return isinstance(kwargs, dict) and kwargs.get("alone") is True


def jobs_from_kwargs(kwargs: Any) -> list[Job]:
    """Every job a message's kwargs carry; :class:`WireError` if any is malformed."""
    jobs, refused = read_jobs(kwargs)
    if refused:
        raise WireError(f"malformed job: {refused[0].reason}")
    return jobs


def job_ids_in(kwargs: Any) -> list[str]:
    """The valid job ids readable in possibly malformed kwargs, so their jobs can be failed."""
    items = kwargs.get("jobs") if isinstance(kwargs, dict) else None
    if not isinstance(items, list):
        return []
    ids = []
    for item in items:
        try:
            ids.append(check_job_id(item.get("id") if isinstance(item, dict) else None))
        except InvalidJobError:
            continue
    return ids


def jobs_in_headers(headers: Any) -> int:
    """How many jobs a message says it carries (:data:`JOBS_HEADER`; 1 when absent or odd).

    Only a weight for prefetching: a message that lies is still bounded by its bytes.
    """
    count = headers.get(JOBS_HEADER) if isinstance(headers, dict) else None
    if isinstance(count, int) and not isinstance(count, bool):
        return min(max(count, 1), MAX_JOBS_PER_MESSAGE)
    return 1


def chunk_jobs(jobs: Sequence[Job], most_jobs: int, most_bytes: int) -> list[list[Job]]:
    """``jobs`` in order, split into messages of at most ``most_jobs`` jobs and about
    ``most_bytes`` bytes (a job bigger than that alone makes a message of its own), and
    wherever the priority or the lane changes (a message's jobs share its list)."""
    chunks: list[list[Job]] = []
    current: list[Job] = []
    size = 0
    for job in jobs:
        weight = max(job.wire_size(), job.source_bytes)
        if current and (
            len(current) >= most_jobs
            or size + weight > most_bytes
            or job.priority != current[0].priority
            or job.lane != current[0].lane
        ):
            chunks.append(current)
            current, size = [], 0
        current.append(job)
        size += weight
    if current:
        chunks.append(current)
    return chunks


_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


class Message(NamedTuple):
    """An encoded message: its Celery task id, kombu delivery tag, raw envelope, priority, and
    how many jobs it carries."""

    id: str
    tag: str
    raw: str
    priority: str = "normal"
    jobs: int = 1
    lane: str = ""


def encode_message(jobs: list[Job], queue: str, message_id: str | None = None) -> str:
    """A Celery protocol-2 task message for ``jobs``, in kombu's Redis envelope."""
    return build_message(jobs, queue, message_id).raw


class BodySigner(Protocol):
    """Signs a task message's body (see ``producer.signing``)."""

    content_type: str

    def sign(self, payload: Any) -> bytes:
        """The signed body for ``payload``."""
        ...


def build_message(
    jobs: list[Job],
    queue: str,
    message_id: str | None = None,
    alone: bool = False,
    signer: BodySigner | None = None,
) -> Message:
    """A Celery protocol-2 task message for ``jobs`` (all of one priority: the first's).

    Written by hand rather than through kombu so a producer can push many messages in one
    Redis pipeline without importing Celery. The integration tests prove a stock Celery
    worker consumes it.
    """
    return _build_message(jobs, queue, message_id, alone, signer)


def _build_message(
    jobs: list[Job],
    queue: str,
    message_id: str | None,
    alone: bool,
    signer: BodySigner | None,
) -> Message:
    if not jobs:
        raise ValueError("a message carries at least one job")
    task_id = message_id or (jobs[0].id if len(jobs) == 1 else new_job_id())
    tag = str(uuid.uuid4())
    payload = [
        [],
        jobs_to_kwargs(jobs, alone),
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    # The body travels as JSON text, not base64 (kombu reads an envelope without
    # body_encoding as it is): image bytes are base64-encoded once on the wire, not twice.
    body = signer.sign(payload).decode("ascii") if signer else dumps_json(payload)
    # argsrepr/kwargsrepr are what Celery logs: job ids only, never image bytes.
    ids = ", ".join(job.id for job in jobs[:3]) + (", ..." if len(jobs) > 3 else "")
    envelope = {
        "body": body,
        "content-encoding": "utf-8",
        "content-type": signer.content_type if signer else "application/json",
        "headers": {
            "lang": "py",
            "task": TASK_CLASSIFY,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": "()",
            "kwargsrepr": f"{{'jobs': <{len(jobs)} job(s): {ids}>}}",
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
            JOBS_HEADER: len(jobs),
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": lane_queue(queue, jobs[0].lane)},
            "priority": PRIORITIES[jobs[0].priority],
            "delivery_tag": tag,
        },
    }
    return Message(task_id, tag, dumps_json(envelope), jobs[0].priority, len(jobs), jobs[0].lane)


@dataclass(frozen=True)
class TopK:
    """One of a result's best guesses."""

    label: str
    score: float


@dataclass(frozen=True)
class JobResult:
    """A job's answer: the dict users read, stored as the Celery result of the job id."""

    job_id: str
    status: str
    model: str | None = None
    version: str | None = None
    label: str | None = None
    class_index: int | None = None
    score: float | None = None
    top_k: list[TopK] = field(default_factory=list)
    error: str | None = None
    batch_size: int | None = None
    #: Only for jobs that asked (``explain``): see worker.explain.
    explanation: dict[str, Any] | None = None

    @classmethod
    def failure(
        cls, job: Job | str, error: str, model: str | None = None, version: str | None = None
    ) -> JobResult:
        """A FAILURE result for a job (or a bare job id) with a message saying why."""
        error = bounded(error)
        if isinstance(job, Job):
            return cls(job.id, FAILURE, model or job.model, version or job.version, error=error)
        return cls(job, FAILURE, model, version, error=error)

    @classmethod
    def expired(cls, job: Job) -> JobResult:
        """The EXPIRED result of a job whose deadline passed before its batch started."""
        return cls(job.id, EXPIRED, job.model, job.version,
                   error=f"its deadline of {job.deadline_s:g} s passed before it was started; "
                   "it was not computed")  # fmt: skip

    @classmethod
    def cancelled(cls, job_id: str) -> JobResult:
        """The CANCELLED result a client stores to withdraw a job."""
        return cls(job_id, CANCELLED, error="cancelled before it was computed")

    def to_dict(self) -> dict[str, Any]:
        """The result dict users see (see the README)."""
        return {
            "job_id": self.job_id,
            "status": self.status,
            "model": self.model,
            "version": self.version,
            "label": self.label,
            "class_index": self.class_index,
            "score": self.score,
            "top_k": [{"label": t.label, "score": t.score} for t in self.top_k],
            "error": self.error,
            "batch_size": self.batch_size,
            **({} if self.explanation is None else {"explanation": self.explanation}),
        }


def pending_result(job_id: str) -> dict[str, Any]:
    """The dict returned for a job that has no result yet (or an unknown id)."""
    return JobResult(job_id, PENDING).to_dict()


def encode_result_meta(result: JobResult) -> str:
    """The Celery result meta for a job, as Celery's Redis backend stores it.

    The Celery state is SUCCESS whenever the job was answered: the job's own outcome, SUCCESS
    or FAILURE with its reason, is the ``status`` inside the result dict, so that
    ``AsyncResult(job_id).get()`` returns that dict in both cases instead of raising.
    """
    return dumps_json(
        {
            "status": SUCCESS,
            "result": result.to_dict(),
            "traceback": None,
            "children": [],
            "date_done": datetime.now(timezone.utc).isoformat(),
            "task_id": result.job_id,
        }
    )


def decode_result_meta(raw: bytes | str) -> dict[str, Any]:
    """The result dict inside a stored Celery result meta; :class:`WireError` if malformed."""
    try:
        meta = loads_json(raw)
        result = meta["result"]
        if meta.get("status") == FAILURE and isinstance(result, dict) and "exc_type" in result:
            # Celery's own failure format (a plain Celery worker refused the task).
            message = result.get("exc_message")
            if isinstance(message, list):
                message = " ".join(str(part) for part in message)
            error = f"{result['exc_type']}: {message}"
            return JobResult.failure(str(meta.get("task_id")), error).to_dict()
        if not isinstance(result, dict) or "status" not in result:
            raise TypeError("result is not a Batchery result dict")
        return result
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"malformed result meta: {exc}") from exc
