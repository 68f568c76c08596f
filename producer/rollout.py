"""Shadow and canary rollouts: registry state the workers follow, guardrails read from Redis.

A rollout lives beside ``PROMOTED`` in ``<name>/ROLLOUT`` (JSON, and its signature when the
registry is signed): a **shadow** version also runs on a share of the jobs that name no
version, its answers never returned; a **canary** version answers a share of them, the served
version running on those jobs too so their agreement is measured. Which jobs is decided by a
hash of the job id, so a redelivered job, or one in a split message, meets the same version.
A job that names a version is never rerouted.

Rolling back must not need the signing key (workers and gateways hold none): an unsigned
switch in Redis (:func:`producer.wire.rollout_stopped_key`) names a canary version no longer
to be served; it can only send jobs back to the signed served version. Promoting, or
starting a rollout, signs like ``PROMOTED`` does (``batchery models canary ... --watch``
is the process that runs the guardrails and holds the key).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from producer.monitoring import Profile, baseline_of, drift, read_accuracy
from producer.wire import (
    MONITOR_BUCKET_S,
    monitor_key,
    rollout_history_key,
    rollout_start_key,
)

#: Fewest comparisons before agreement, and feedback jobs before accuracy, are judged.
MIN_COMPARED = 50
MIN_FEEDBACK = 30
#: Decisions kept per model (``batchery models history``).
HISTORY = 100


@dataclass(frozen=True)
class Rollout:
    """A model's rollout: a shadow, a canary, or both, and the canary's guardrails."""

    model: str
    shadow: str | None = None
    shadow_percent: float = 0.0
    canary: str | None = None
    canary_percent: float = 0.0
    promote_after: int = 1000
    max_drift: float | None = None
    min_agreement: float | None = 0.9
    min_accuracy: float | None = None
    max_error_rate: float = 0.05
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """As ``ROLLOUT`` stores it."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Rollout:
        """From :meth:`to_json`'s form (unknown fields ignored)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def picked(job_id: str, percent: float, salt: str) -> bool:
    """Whether ``job_id`` is in the ``percent`` share picked for ``salt`` (``canary`` or
    ``shadow``): the same answer for the same id, on every worker, every time."""
    if percent <= 0:
        return False
    digest = hashlib.blake2b(f"{salt}\0{job_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 < percent * 100


def read_since(client: redis.Redis, model: str, version: str, since: float,
               now: float | None = None) -> Profile:  # fmt: skip
    """``model@version``'s monitoring counts from the minute of ``since`` on (the buckets
    still kept)."""
    first = int(since // MONITOR_BUCKET_S)
    last = int((time.time() if now is None else now) // MONITOR_BUCKET_S)
    with client.pipeline(transaction=False) as pipe:
        for minute in range(max(first, last - 240), last + 1):
            pipe.hgetall(monitor_key(model, version, minute))
        hashes = pipe.execute()
    return Profile.from_hashes(hashes)


def mark_start(client: redis.Redis, rollout: Rollout) -> None:
    """Keep the canary version's counts as they stand at its start (see :func:`judge`)."""
    assert rollout.canary is not None
    now = read_since(client, rollout.model, rollout.canary, rollout.started)
    key = rollout_start_key(rollout.model)
    client.set(key, json.dumps({"version": rollout.canary, "counts": dict(now.counts)}))


def since_start(client: redis.Redis, rollout: Rollout) -> Profile:
    """The canary version's counts since its canary started."""
    assert rollout.canary is not None
    live = read_since(client, rollout.model, rollout.canary, rollout.started)
    raw = client.get(rollout_start_key(rollout.model))
    start = json.loads(raw) if raw else {}
    if start.get("version") == rollout.canary:
        live.counts.subtract(Counter(start.get("counts") or {}))
        live.counts = +live.counts  # only what came since
    return live


@dataclass(frozen=True)
class Decision:
    """What the guardrails say about a canary now: ``continue``, ``promote`` or ``rollback``."""

    action: str
    reason: str
    figures: dict[str, Any]


def judge(
    client: redis.Redis, rollout: Rollout, served: str, served_meta: dict[str, Any],
    drift_threshold: float, window_jobs: int,
) -> Decision:  # fmt: skip
    """The canary's guardrails on what its jobs showed since it started."""
    assert rollout.canary is not None
    name, candidate = rollout.model, rollout.canary
    live = since_start(client, rollout)
    answered, failed = live.jobs, live.counts.get("err", 0)
    jobs = answered + failed
    compared, agreed = live.counts.get("compared", 0), live.counts.get("agree", 0)
    accuracy = read_accuracy(client, name, candidate)
    figures: dict[str, Any] = {"jobs": jobs, "failed": failed, "compared": compared,
                               "agreement": agreed / compared if compared else None,
                               "feedback": accuracy.jobs, "accuracy": accuracy.rate}  # fmt: skip
    if jobs and failed / jobs > rollout.max_error_rate and jobs >= 20:
        return Decision("rollback", f"error rate {failed / jobs:.1%} over "
                        f"{rollout.max_error_rate:.1%}", figures)  # fmt: skip
    judged = rollout.min_agreement is not None and compared >= MIN_COMPARED
    if judged and agreed / compared < (rollout.min_agreement or 0.0):
        return Decision("rollback", f"agreement with {name}@{served} "
                            f"{agreed / compared:.1%} under {rollout.min_agreement:.1%}",
                            figures)  # fmt: skip
    if rollout.min_accuracy is not None and accuracy.jobs >= MIN_FEEDBACK:
        rate = accuracy.rate or 0.0
        if rate < rollout.min_accuracy:
            return Decision("rollback", f"live accuracy {rate:.1%} of {accuracy.jobs} under "
                            f"{rollout.min_accuracy:.1%}", figures)  # fmt: skip
    limit = rollout.max_drift if rollout.max_drift is not None else drift_threshold
    baseline, _ = baseline_of(client, served_meta, name, served, window_jobs)
    if baseline is not None and answered >= 200:
        worst = max(drift(baseline, live, limit), key=lambda d: d.distance, default=None)
        if worst is not None:
            figures["drift"] = {"distribution": worst.name, "distance": round(worst.distance, 4)}
            if worst.flagged:
                return Decision("rollback", f"{worst.name} drift {worst.distance:.3f} over "
                                f"{limit:g} against {name}@{served}'s baseline",
                                figures)  # fmt: skip
    if jobs >= rollout.promote_after:
        if rollout.min_agreement is not None and compared < MIN_COMPARED:
            return Decision("continue", "too few comparisons to judge agreement", figures)
        if rollout.min_accuracy is not None and accuracy.jobs < MIN_FEEDBACK:
            return Decision("continue", f"waiting for {MIN_FEEDBACK} feedback jobs", figures)
        return Decision("promote", f"{jobs} jobs with every guardrail holding", figures)
    return Decision("continue", f"{jobs} of {rollout.promote_after} jobs", figures)


def record(client: redis.Redis, model: str, entry: dict[str, Any]) -> None:
    """Keep a decision in the model's short history (newest first)."""
    key = rollout_history_key(model)
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(key, json.dumps({"at": time.time(), **entry}, sort_keys=True))
        pipe.ltrim(key, 0, HISTORY - 1)
        pipe.execute()


def history(client: redis.Redis, model: str) -> list[dict[str, Any]]:
    """The model's rollout decisions, newest first."""
    return [json.loads(raw) for raw in client.lrange(rollout_history_key(model), 0, -1)]


def agreement_counts(candidate: list[str | None], served: list[str | None]) -> Counter[str]:
    """``compared`` and ``agree`` for two versions' labels on the same jobs."""
    pairs = [(c, s) for c, s in zip(candidate, served, strict=True) if c and s]
    return Counter({"compared": len(pairs), "agree": sum(c == s for c, s in pairs)})
