"""The batched task: many messages in, one forward pass per model version, one result per job.

The batch contract: every job in the batch gets exactly one result, whatever raises on the
way. A bad field fails its own job where the message enters; a broken image fails only its
own job; anything else that raises is narrowed down to the jobs at fault by splitting the
batch (:func:`answer_each`), so the others still get their answers.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol

import numpy as np
import redis

from producer.connections import ReplicaAcks
from producer.errors import BatchContractError, BatcheryError, InvalidImageError, WireError
from producer.images import image_header, read_shared
from producer.ledger import Ledger, settle, settle_part
from producer.monitoring import add_counts
from producer.monitoring import observe as observe_batch
from producer.rollout import Rollout, agreement_counts, picked
from producer.settings import Settings
from producer.signing import Signer
from producer.wire import (
    DEAD_LETTER_KEY,
    EXPIRED,
    FAILURE,
    JOB_KEY_PREFIX,
    MAX_JOBS_PER_MESSAGE,
    RESULT_KEY_PREFIX,
    STATS_KEY,
    SUCCESS,
    WEBHOOK_STREAM,
    Job,
    JobResult,
    Refusal,
    TopK,
    bounded,
    build_message,
    chunk_jobs,
    deaths_key,
    encode_result_meta,
    excerpt,
    job_ids_in,
    lane_of_format,
    new_job_id,
    read_jobs,
    result_key,
    rollout_stopped_key,
)
from worker import explain as worker_explain
from worker import preprocess
from worker.metrics import Metrics
from worker.models import LoadedModel, ModelCache, worker_kind

log = logging.getLogger(__name__)

#: The metric label of a model or version the registry does not hold.
OTHER = "other"


class RequestLike(Protocol):
    """What the runner needs of a celery-batches ``SimpleRequest``."""

    id: str
    kwargs: Any


class BatchRunner:
    """Runs batches in one worker process: decode, predict, postprocess, store."""

    def __init__(
        self,
        settings: Settings,
        models: ModelCache,
        redis_client: redis.Redis,
        recorded: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.redis = redis_client
        self.metrics = recorded
        self.signer = Signer.from_settings(settings)
        self.ledger = Ledger(redis_client, settings.queue)
        self.acks = ReplicaAcks.from_settings(settings)
        self._labels: dict[tuple[str, str], tuple[str, str]] = {}
        #: (model, version) as jobs name them -> the version's own batch budget in seconds
        #: (its manifest's ``batch_budget_ms``), for the main process (worker.budget).
        self.budgets: dict[tuple[str | None, str | None], float] = {}
        #: Jobs of the batch running that were answered before it (see run and answer).
        self.answered_before: set[str] = set()
        #: ``full`` (every format) or ``lite`` (LiteRT only): see worker.models.worker_kind.
        self.kind = worker_kind(settings.worker_kind)
        #: The batch's monitoring counts per (model, version) (producer.monitoring).
        self.monitored: dict[tuple[str, str], Counter[str]] = {}

    def run(self, requests: Sequence[RequestLike]) -> list[JobResult]:
        """Answer every job in these messages and store the answers; return them.

        Only a Redis error, or too few replica acks, escapes (the batch is then given back):
        whatever else goes wrong ends as a result for every job (see :func:`answer_each`).

        At-least-once delivery means a job can come again: one already answered is skipped
        (idempotent). A job whose worker process died holding it comes back with a death
        count: it runs alone, so it can't take innocent jobs down with it, and after
        ``poison_kills`` deaths it is failed and dead-lettered instead of run again.
        """
        started = time.time()
        self.answered_before = set()
        self.monitored = {}
        jobs, results, unanswerable = self.read(requests)
        try:
            results.extend(self.answer(jobs))
        except redis.RedisError:
            raise
        except Exception as exc:  # a bug of ours outside the per-job contract
            log.exception("batch of %d jobs failed outside the batch contract", len(jobs))
            done = {result.job_id for result in results}
            reason = f"internal error: {type(exc).__name__}: {exc}"
            results.extend(JobResult.failure(job, reason) for job in jobs if job.id not in done)
        # A message split over several batches is struck off the ledger by the batch that
        # took its last jobs (worker.batching marks the others ``settle = False``).
        settled = [request.id for request in requests
                   if isinstance(request.id, str) and getattr(request, "settle", True)]  # fmt: skip
        # A part of a split message takes its newly answered jobs off the backlog at once.
        answered_before = self.answered_before
        parts = [
            (request.id, sum(jid not in answered_before for jid in job_ids_in(request.kwargs)))
            for request in requests
            if isinstance(request.id, str) and not getattr(request, "settle", True)
        ]
        self.store(
            results, quiet={job.id for job in jobs if not job.notify}, settled=settled,
            refused=unanswerable, parts=parts,
        )  # fmt: skip
        self.report(jobs, results, started)
        return results

    def read(self, requests: Sequence[RequestLike]) -> tuple[list[Job], list[JobResult], int]:
        """The valid jobs of these messages (each id once), FAILURE results for the invalid
        ones, and how many invalid jobs had no valid id to answer them by."""
        jobs: dict[str, Job] = {}
        results: list[JobResult] = []
        unanswerable = 0
        limit = self.settings.max_image_bytes
        default = self.settings.default_deadline_s
        for request in requests:
            try:
                valid, refused = read_jobs(request.kwargs, limit)
            except WireError as exc:
                # No jobs list: the message's own id is its job's, for a single job.
                message_id = request.id if isinstance(request.id, str) else None
                refused = [Refusal(message_id, f"malformed message: {exc}")]
                valid = []
            for refusal in refused:
                if refusal.job_id is None:
                    unanswerable += 1
                else:
                    results.append(JobResult.failure(refusal.job_id, refusal.reason))
            if refused:
                log.warning("message %s: %d jobs refused, first: %s", excerpt(request.id, 64),
                            len(refused), refused[0].reason)  # fmt: skip
            for job in valid:
                if default is not None and job.deadline_s is None:
                    job = replace(job, deadline_s=default)
                jobs.setdefault(job.id, job)
        refused_ids = {result.job_id for result in results}
        return [job for jid, job in jobs.items() if jid not in refused_ids], results, unanswerable

    def answer(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Results for fresh jobs; jobs already answered, or isolated, get none here."""
        answered, deaths = self._history(jobs)
        self.answered_before = answered
        fresh = [job for job in jobs if job.id not in answered]
        if answered:
            log.info("skipped %d jobs already answered or cancelled", len(answered))
            counted = [deaths_key(jid) for jid in answered if jid in deaths]
            if counted:  # they died after answering: nothing to hold against them
                self.redis.delete(*counted)
        # Deadlines are checked here, where the batch already read Redis: free for the rest.
        now = time.time()
        expired = [job for job in fresh if job.expired(now)]
        if expired:
            fresh = [job for job in fresh if not job.expired(now)]
        kills = self.settings.poison_kills
        poison = [job for job in fresh if deaths.get(job.id, 0) >= kills]
        suspects = [job for job in fresh if 0 < deaths.get(job.id, 0) < kills]
        if suspects and len(fresh) > 1:
            self.isolate(suspects)
        else:
            suspects = []
        held = {job.id for job in poison} | {job.id for job in suspects}
        runnable = [job for job in fresh if job.id not in held]
        if self.kind == "lite":
            # A job whose version is not LiteRT (its lane chosen before a promotion, say)
            # goes on to a worker that can serve it, never fails here.
            # One registry read per version in the batch, not per job.
            lanes = {key: self._lane(*key) for key in {(j.model, j.version) for j in runnable}}
            foreign = [job for job in runnable if lanes[(job.model, job.version)] != "lite"]
            if foreign:
                self.hand_over(foreign)
                runnable = [job for job in runnable if job not in foreign]
        late = [JobResult.expired(job) for job in expired]
        return late + self.fail_poison(poison, deaths) + self.classify(runnable)

    def report(self, jobs: Sequence[Job], results: Sequence[JobResult], started: float) -> None:
        """Log the batch (one line, with every job id) and record its metrics."""
        if not results:
            return
        stored = time.time()
        failed = sum(r.status == FAILURE for r in results)
        versions = sorted({f"{r.model}@{r.version}" for r in results if r.model})
        log.info(
            "batch of %d jobs (%s): %d failed, %.1f ms",
            len(results), ", ".join(versions) or "no model", failed,
            (stored - started) * 1000,
            extra={"job_ids": [r.job_id for r in results], "batch_size": len(results),
                   "models": versions, "failed": failed},
        )  # fmt: skip
        if self.metrics is None:
            return
        # One increment per (model, version, status, priority), not per job: few in a batch.
        priorities = {job.id: job.priority for job in jobs}
        outcomes = Counter(
            (*self._label(r.model, r.version), r.status, priorities.get(r.job_id, "normal"))
            for r in results
        )
        for labels, count in outcomes.items():
            self.metrics.jobs.labels(*labels).inc(count)
        for r in results:
            if r.status == SUCCESS and r.score is not None:
                self.metrics.top1_score.labels(*self._label(r.model, r.version)).observe(r.score)
        answered = {result.job_id for result in results}
        for job in jobs:
            if job.submitted_at and job.id in answered:
                self.metrics.queue_wait.observe(max(0.0, started - job.submitted_at))
                self.metrics.end_to_end.observe(max(0.0, stored - job.submitted_at))

    def _label(self, model: str | None, version: str | None) -> tuple[str, str]:
        """Metric labels for a result: a model and version the registry holds, or ``other``.

        A job may name anything; only what exists becomes a label, so no sender can
        multiply the series a worker exports.
        """
        key = (model or "", version or "")
        label = self._labels.get(key)
        if label is None:
            registry = self.models.registry
            try:
                exists = bool(model) and version in (None, *registry.versions(str(model)))
            except OSError:
                exists = False
            label = key if exists else (OTHER, OTHER)
            if len(self._labels) < 1024:
                self._labels[key] = label
        return label

    def _history(self, jobs: Sequence[Job]) -> tuple[set[str], dict[str, int]]:
        """Which jobs already have a result, and how often each killed a worker: one trip."""
        if not jobs:
            return set(), {}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.mget([result_key(job.id) for job in jobs])
            pipe.mget([deaths_key(job.id) for job in jobs])
            stored, counts = pipe.execute()
        answered = {job.id for job, raw in zip(jobs, stored, strict=True) if raw is not None}
        deaths = {job.id: _count(n) for job, n in zip(jobs, counts, strict=True) if n is not None}
        return answered, deaths

    def _lane(self, model: str | None, version: str | None) -> str:
        """The lane jobs for ``model@version`` belong in: its format's (wire.LANES); the main
        lane when it can't be resolved (the worker there answers with the reason)."""
        try:
            return lane_of_format(self.models.resolve(model, version).format)
        except (BatcheryError, OSError, ValueError):
            return ""

    def hand_over(self, jobs: Sequence[Job]) -> None:
        """Send jobs this lite worker can't serve to the main lane, where TensorFlow workers
        take them (in one message, as they came)."""
        queue = self.settings.queue
        moved = [replace(job, lane="") for job in jobs]
        messages = [build_message(chunk, queue, new_job_id(), signer=self.signer)
                    for chunk in chunk_jobs(moved, MAX_JOBS_PER_MESSAGE, 1 << 62)]  # fmt: skip
        self.ledger.push(messages, self.settings.visibility_timeout_s)
        log.warning("handed %d jobs to TensorFlow workers (not LiteRT versions): %s",
                    len(jobs), excerpt(", ".join(job.id for job in jobs), 200))  # fmt: skip

    def isolate(self, jobs: Sequence[Job]) -> None:
        """Send each suspect job back as a message of its own, so a poison one dies alone."""
        queue = self.settings.queue
        messages = [
            build_message(
                [replace(job, lane=self._lane(job.model, job.version))],
                queue,
                new_job_id(),
                alone=True,
                signer=self.signer,
            )
            for job in jobs
        ]
        self.ledger.push(messages, self.settings.visibility_timeout_s)
        log.warning("isolated %d jobs whose worker died: %s", len(jobs),
                    ", ".join(job.id for job in jobs))  # fmt: skip

    def fail_poison(self, jobs: Sequence[Job], deaths: dict[str, int]) -> list[JobResult]:
        """FAILURE results for jobs that killed their worker too often; dead-letter them."""
        if not jobs:
            return []
        results = []
        with self.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                error = (
                    f"this job killed its worker process {deaths[job.id]} times; it was not run "
                    f"again and is in the dead-letter list {DEAD_LETTER_KEY}"
                )
                results.append(JobResult.failure(job, error))
                pipe.lpush(DEAD_LETTER_KEY, json.dumps({
                    "job_id": job.id, "model": job.model, "version": job.version,
                    "deaths": deaths[job.id], "at": time.time(), "error": error,
                }))  # fmt: skip
            pipe.execute()
        log.error("dead-lettered %d poison jobs", len(jobs))
        return results

    def classify(self, jobs: Sequence[Job]) -> list[JobResult]:
        """One result per job, in the jobs' order, whatever goes wrong on the way."""
        by_id: dict[str, JobResult] = {}
        groups: dict[tuple[str | None, str | None], list[Job]] = defaultdict(list)
        for job in jobs:
            groups[(job.model, job.version)].append(job)
        for (name, version), group in groups.items():
            try:
                model = self.models.get(name, version)
            except BatcheryError as exc:
                by_id.update((job.id, JobResult.failure(job, str(exc))) for job in group)
                continue
            except Exception as exc:  # the registry's I/O, a model that won't load
                log.exception("model %s@%s not loaded", excerpt(name), excerpt(version))
                error = f"model not loaded: {type(exc).__name__}: {exc}"
                by_id.update((job.id, JobResult.failure(job, error)) for job in group)
                continue

            budget = model.info.meta.get("batch_budget_ms")
            if isinstance(budget, (int, float)) and budget > 0 and len(self.budgets) < 1024:
                self.budgets[(name, version)] = float(budget) / 1000.0

            def compute(part: Sequence[Job], model: LoadedModel = model) -> list[JobResult]:
                return self._classify_with(model, part)

            answers = answer_each(group, compute)
            rollout = self.models.rollout(model.info.name) if version is None else None
            if rollout is not None:  # a job that names a version is never rerouted
                answers = self._roll_out(rollout, model, group, answers)
            by_id.update((r.job_id, r) for r in answers)
        return [by_id[job.id] for job in jobs]

    def _roll_out(
        self, rollout: Rollout, served: LoadedModel, jobs: Sequence[Job], answers: list[JobResult]
    ) -> list[JobResult]:
        """The shadow runs on its share of ``jobs`` (its answers kept from everyone); the
        canary answers its share, unless stopped. Both counted against the served answers."""
        name = served.info.name
        by_id = {answer.job_id: answer for answer in answers}
        shadow = [job for job in jobs if picked(job.id, rollout.shadow_percent, "shadow")]
        if rollout.shadow and rollout.shadow != served.info.version and shadow:
            self._candidate(name, rollout.shadow, shadow, by_id)
        canary = [job for job in jobs if picked(job.id, rollout.canary_percent, "canary")]
        on = bool(rollout.canary and rollout.canary != served.info.version and canary)
        # The unsigned switch in Redis: read only while a canary is on.
        if on and self.redis.get(rollout_stopped_key(name)) != str(rollout.canary).encode():
            by_id.update(self._candidate(name, str(rollout.canary), canary, by_id))
        return [by_id[answer.job_id] for answer in answers]

    def _candidate(
        self, name: str, version: str, jobs: Sequence[Job], served: dict[str, JobResult]
    ) -> dict[str, JobResult]:
        """``name@version``'s answers to ``jobs`` (their agreement with ``served`` counted in
        its monitoring); a version that can't load leaves the served answers alone."""
        try:
            model = self.models.get(name, version)
        except Exception as exc:  # a candidate must never cost a job
            log.error("%s@%s not run: %s", excerpt(name), excerpt(version), exc)
            return {}

        def compute(part: Sequence[Job]) -> list[JobResult]:
            return self._classify_with(model, part)

        answers = {r.job_id: r for r in answer_each(jobs, compute)}
        if self.settings.monitor:
            counts = self.monitored.setdefault((name, model.info.version), Counter())
            counts.update(agreement_counts([answers[j.id].label for j in jobs],
                                           [served[j.id].label for j in jobs]))  # fmt: skip
        return answers

    def _classify_with(self, model: LoadedModel, jobs: Sequence[Job]) -> list[JobResult]:
        """Decode each job (a bad image fails alone), then one forward pass for the rest.

        Anything else that raises is :func:`answer_each`'s to sort out.
        """
        info = model.info
        began = time.perf_counter()
        inputs: list[np.ndarray] = []
        headers: list[tuple[str, int, int] | None] = []
        ready: list[Job] = []
        results: list[JobResult] = []
        limits = self.settings.max_image_bytes, self.settings.max_image_pixels
        monitor = self.settings.monitor
        for job in jobs:
            try:
                data = job.image
                if job.path is not None:  # the worker reads it, where it may
                    data = read_shared(job.path, self.settings.shared_roots, limits[0])
                inputs.append(preprocess.decode(data, info, *limits))
                if monitor:
                    headers.append(image_header(data))
                ready.append(job)
            except InvalidImageError as exc:
                results.append(JobResult.failure(job, str(exc), info.name, info.version))
        counts = (
            self.monitored.setdefault((info.name, info.version), Counter()) if monitor else None
        )
        if counts is not None and results:
            counts["err"] += len(results)
        if ready:
            observe = self.metrics.forward_pass if self.metrics else None
            pixels = np.stack(inputs)
            normalized = preprocess.normalize(pixels, info)
            probs = model.predict(normalized, observe)
            answers = postprocess(model, ready, probs, self.settings.top_k)
            if counts is not None:
                counts.update(observe_batch(pixels, [a.label or "" for a in answers],
                                            np.array([a.score or 0.0 for a in answers]),
                                            headers))  # fmt: skip
            results.extend(explain(model, ready, normalized, answers))
        if counts is not None:  # microseconds of this version's work, for its latency
            counts["us"] += int((time.perf_counter() - began) * 1e6)
        by_id = {result.job_id: result for result in results}
        return [by_id[job.id] for job in jobs]

    def store(
        self, results: Sequence[JobResult], quiet: Collection[str] = (),
        settled: Sequence[str] = (), refused: int = 0,
        parts: Sequence[tuple[str, int]] = (),
    ) -> None:  # fmt: skip
        """Store a batch's results (see :func:`store_results`)."""
        store_results(self.redis, self.settings.queue, results, self.settings.result_ttl_s,
                      quiet, settled, refused=refused, acks=self.acks, parts=parts,
                      monitored=self.monitored)  # fmt: skip


def answer_each(
    jobs: Sequence[Job], compute: Callable[[Sequence[Job]], list[JobResult]]
) -> list[JobResult]:
    """The batch contract, kept whatever ``compute`` raises: one result per job, in order.

    ``compute`` must give N results for N jobs, in their order. If it raises (a decoder's
    bug, an ``OSError``, a forward pass that fails on one input), or breaks that contract,
    the jobs are split in two and each half runs again, down to single jobs: the jobs that
    were fine get their answers, and each job at fault a FAILURE saying what it raised. At
    most ``2N - 1`` calls, never a retry loop.
    """
    if not jobs:
        return []
    try:
        results = compute(jobs)
        if [result.job_id for result in results] != [job.id for job in jobs]:
            raise BatchContractError(
                f"{len(jobs)} jobs gave {len(results)} results, or not in their order"
            )
        return results
    except Exception as exc:
        if len(jobs) == 1:
            log.error("job %s failed: %s: %s", jobs[0].id, type(exc).__name__, bounded(str(exc)))
            return [JobResult.failure(jobs[0], f"job failed: {type(exc).__name__}: {exc}")]
        log.warning("a batch of %d jobs raised %s: split in two to find the jobs at fault",
                    len(jobs), type(exc).__name__)  # fmt: skip
        half = len(jobs) // 2
        return answer_each(jobs[:half], compute) + answer_each(jobs[half:], compute)


def _count(raw: Any) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        return 0


def store_results(
    client: redis.Redis, queue: str, results: Sequence[JobResult], ttl_s: int,
    quiet: Collection[str] = (), settled: Sequence[str] = (), batch: bool = True,
    refused: int = 0, acks: ReplicaAcks | None = None, parts: Sequence[tuple[str, int]] = (),
    monitored: Mapping[tuple[str, str], Mapping[str, int]] | None = None,
) -> None:  # fmt: skip
    """Write every result, publish it to waiting clients and count it: one round trip.

    A result is written only if the job has none yet (SET NX): a job delivered twice keeps
    its first answer, so no one ever sees two; a second answer is counted as
    ``computed_twice``, and the counters count each job once (written and counted in one
    script, so a process killed mid-store can't leave them apart). Results of ``quiet`` jobs
    are written but not published. The ``settled`` messages are struck off ``queue``'s
    ledger. ``batch``: count a batch (not for refused messages). ``refused``: jobs refused
    without an id to answer them by. ``acks``: return only once that many replicas hold the
    writes, else raise :class:`~producer.errors.ReplicaAckError` (the batch is given back,
    and its messages acked only when a later try is confirmed). ``monitored``: the batch's
    monitoring counts per model version, added to this minute's hashes in the same trip.
    """
    args: list[Any] = [ttl_s, f"{time.time():.3f}", 1 if batch else 0, refused,
                       RESULT_KEY_PREFIX, JOB_KEY_PREFIX]  # fmt: skip
    for result in results:
        args += [
            result_key(result.job_id),
            encode_result_meta(result),
            0 if result.job_id in quiet else 1,
            STAT_OF[result.status],
        ]
    with client.pipeline(transaction=False) as pipe:
        pipe.eval(_STORE, 2, STATS_KEY, WEBHOOK_STREAM, *args)
        if results:
            pipe.delete(*(deaths_key(result.job_id) for result in results))
        settle(pipe, queue, settled)
        for message_id, answered in parts:  # parts of split messages (see worker.batching)
            settle_part(pipe, queue, message_id, answered)
        for (model, version), counts in (monitored or {}).items():
            add_counts(pipe, model, version, counts)
        if acks is not None:
            acks.add(pipe)
        replies = pipe.execute()
    if acks is not None:
        acks.check(replies, f"the results of {len(results)} jobs")


#: The stats counter of each status a worker stores.
STAT_OF = {SUCCESS: "done", FAILURE: "failed", EXPIRED: "expired"}

# KEYS: the stats hash, the webhook stream. ARGV: ttl, now, batches, refused, the result and
# job key prefixes, then key, meta, notify, counter per result. A stored result whose job's
# record names a callback queues a webhook delivery, in the same script: no answer is stored
# without its delivery. A result already there is kept; if it is a cancellation, this one
# was computed for nothing (counted as cancelled_late), else it was computed twice. A meta is
# compact JSON (producer.wire.dumps_json), or spaced from a producer before it: both match.
_STORE = """
local counts = {done = 0, failed = 0, expired = 0}
local twice, late = 0, 0
local skip = #ARGV[5] + 1
for i = 7, #ARGV, 4 do
  if redis.call('SET', ARGV[i], ARGV[i + 1], 'EX', tonumber(ARGV[1]), 'NX') then
    if ARGV[i + 2] == '1' then redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
    counts[ARGV[i + 3]] = counts[ARGV[i + 3]] + 1
    local id = string.sub(ARGV[i], skip)
    local record = redis.call('GET', ARGV[6] .. id)
    local tab = record and string.find(record, '\t', 1, true)
    if tab and tab < #record then
      redis.call('XADD', KEYS[2], '*', 'job', id, 'url', string.sub(record, tab + 1))
    end
  elseif string.find(redis.call('GET', ARGV[i]) or '', '"status": ?"CANCELLED"') then
    late = late + 1
  else
    twice = twice + 1
  end
end
local done, failed = counts['done'], counts['failed']
redis.call('HINCRBY', KEYS[1], 'done', done)
redis.call('HINCRBY', KEYS[1], 'failed', failed)
if counts['expired'] > 0 then redis.call('HINCRBY', KEYS[1], 'expired', counts['expired']) end
if twice > 0 then redis.call('HINCRBY', KEYS[1], 'computed_twice', twice) end
if late > 0 then redis.call('HINCRBY', KEYS[1], 'cancelled_late', late) end
if ARGV[4] ~= '0' then redis.call('HINCRBY', KEYS[1], 'refused', tonumber(ARGV[4])) end
if ARGV[3] == '1' then
  redis.call('HINCRBY', KEYS[1], 'batches', 1)
  redis.call('HSET', KEYS[1], 'last_batch_at', ARGV[2])
end
return done + failed + counts['expired']
"""


def explain(
    model: LoadedModel, jobs: Sequence[Job], inputs: np.ndarray, results: list[JobResult]
) -> list[JobResult]:
    """``results`` with an explanation for each job that asked: one gradient pass for all."""
    asked = [i for i, job in enumerate(jobs) if job.explain]
    if not asked:
        return results
    if model.explain is None:
        source = model.info.meta.get("optimized", {}).get("source_version")
        refusal = {
            "error": f"{model.info.key} is a LiteRT version, which explains nothing; "
            f"ask for version {source} (its Keras source) to have an explanation"
        }
        return [replace(r, explanation=refusal) if jobs[i].explain else r
                for i, r in enumerate(results)]  # fmt: skip
    targets = np.asarray([results[i].class_index for i in asked], np.int32)
    # As many images a gradient pass as a forward pass (each job is STEPS of them): the
    # memory of a batch of explanations stays that of a batch of predictions.
    per_pass = max(1, model.batch_size // worker_explain.STEPS)
    maps = np.concatenate([
        model.explain(inputs[asked[i : i + per_pass]], targets[i : i + per_pass])
        for i in range(0, len(asked), per_pass)
    ])  # fmt: skip
    explained = list(results)
    for i, attribution in zip(asked, maps, strict=True):
        explained[i] = replace(results[i], explanation=worker_explain.explanation(
            attribution, str(results[i].label)))  # fmt: skip
    return explained


def postprocess(
    model: LoadedModel, jobs: Sequence[Job], probs: np.ndarray, top_k: int
) -> list[JobResult]:
    """Turn each row of probabilities into its job's result."""
    labels = model.info.labels
    k = min(top_k, len(labels))
    size = model.batch_size
    results = []
    for i, (job, row) in enumerate(zip(jobs, probs, strict=True)):
        best = np.argsort(row)[::-1][:k]
        # The forward pass this job was in: jobs go through ``batch_size`` at a time.
        in_pass = min(size, len(jobs) - (i // size) * size)
        results.append(
            JobResult(
                job_id=job.id,
                status=SUCCESS,
                model=model.info.name,
                version=model.info.version,
                label=labels[int(best[0])],
                class_index=int(best[0]),
                score=float(row[best[0]]),
                top_k=[TopK(labels[int(j)], float(row[j])) for j in best],
                batch_size=in_pass,
            )
        )
    return results
