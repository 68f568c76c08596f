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
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple, Protocol

from producer.errors import WireError

#: The Celery task every message is addressed to.
TASK_CLASSIFY = "batchery.classify"

#: Celery's own result key prefix: results live where a plain Celery client looks for them.
RESULT_KEY_PREFIX = "celery-task-meta-"

#: Worker counters (a Redis hash): jobs done, jobs failed, batches run, last batch time.
STATS_KEY = "batchery:stats"

#: Jobs that killed their worker too often, one JSON object each (never the image).
DEAD_LETTER_KEY = "batchery:dead"

#: kombu's Redis transport keeps delivered, unacknowledged messages in this hash.
UNACKED_KEY = "unacked"

#: Every message Batchery pushes, until a worker has answered its jobs (see ledger.py):
#: message id -> "<delivery tag> <raw envelope>", and message id -> when to check on it.
LEDGER_KEY = "batchery:ledger"
LEDGER_DUE_KEY = "batchery:ledger:due"

SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
PENDING = "PENDING"


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


def new_job_id() -> str:
    """A fresh job id (a UUID4, as Celery's task ids are)."""
    return str(uuid.uuid4())


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

    def to_wire(self) -> dict[str, Any]:
        """The job as a JSON-ready dict (image bytes in base64)."""
        wire = {
            "id": self.id,
            "image": base64.b64encode(self.image).decode("ascii"),
            "model": self.model,
            "version": self.version,
            "submitted_at": self.submitted_at,
        }
        if not self.notify:
            wire["notify"] = False
        return wire

    @classmethod
    def from_wire(cls, obj: Any) -> Job:
        """Rebuild a job from :meth:`to_wire`'s dict; :class:`WireError` if it is malformed."""
        try:
            job_id = obj["id"]
            if not isinstance(job_id, str) or not job_id:
                raise TypeError(f"job id must be a non-empty string, got {job_id!r}")
            image = base64.b64decode(obj["image"], validate=True)
            model, version = obj.get("model"), obj.get("version")
            for name, value in (("model", model), ("version", version)):
                if value is not None and not isinstance(value, str):
                    raise TypeError(f"{name} must be a string or null, got {value!r}")
            return cls(
                id=job_id,
                image=image,
                model=model,
                version=version,
                submitted_at=float(obj.get("submitted_at") or 0.0),
                notify=obj.get("notify", True) is not False,
            )
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise WireError(f"malformed job: {exc}") from exc


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
    """The jobs a message's kwargs carry; :class:`WireError` if the envelope is malformed."""
    if not isinstance(kwargs, dict) or not isinstance(kwargs.get("jobs"), list):
        raise WireError("message kwargs must be an object with a 'jobs' list")
    return [Job.from_wire(item) for item in kwargs["jobs"]]


def job_ids_in(kwargs: Any) -> list[str]:
    """The job ids readable in possibly malformed kwargs, so their jobs can be failed."""
    items = kwargs.get("jobs") if isinstance(kwargs, dict) else None
    if not isinstance(items, list):
        return []
    return [i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)]


_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"


class Message(NamedTuple):
    """An encoded message: its Celery task id, kombu delivery tag, and raw envelope."""

    id: str
    tag: str
    raw: str


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
    """A Celery protocol-2 task message for ``jobs``, in kombu's Redis envelope.

    Written by hand rather than through kombu so a producer can push many messages in one
    Redis pipeline without importing Celery. The integration tests prove a stock Celery
    worker consumes it.
    """
    if not jobs:
        raise ValueError("a message carries at least one job")
    task_id = message_id or (jobs[0].id if len(jobs) == 1 else new_job_id())
    tag = str(uuid.uuid4())
    payload = [
        [],
        jobs_to_kwargs(jobs, alone),
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None},
    ]
    body = signer.sign(payload) if signer else json.dumps(payload).encode()
    # argsrepr/kwargsrepr are what Celery logs: job ids only, never image bytes.
    ids = ", ".join(job.id for job in jobs[:3]) + (", ..." if len(jobs) > 3 else "")
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
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
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": tag,
        },
    }
    return Message(task_id, tag, json.dumps(envelope))


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

    @classmethod
    def failure(
        cls, job: Job | str, error: str, model: str | None = None, version: str | None = None
    ) -> JobResult:
        """A FAILURE result for a job (or a bare job id) with a message saying why."""
        if isinstance(job, Job):
            return cls(job.id, FAILURE, model or job.model, version or job.version, error=error)
        return cls(job, FAILURE, model, version, error=error)

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
    return json.dumps(
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
        meta = json.loads(raw)
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
