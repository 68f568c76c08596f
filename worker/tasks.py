"""The batched task: many messages in, one forward pass per model version, one result per job.

The batch contract: every job in the batch gets exactly one result, and a failure is recorded
against every job it touched (a broken image fails only its own job; a failed forward pass
fails the jobs that were in it).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import redis

from producer import ledger
from producer.errors import BatcheryError, InvalidImageError, WireError
from producer.settings import Settings
from producer.signing import Signer
from producer.wire import (
    DEAD_LETTER_KEY,
    FAILURE,
    STATS_KEY,
    SUCCESS,
    Job,
    JobResult,
    TopK,
    build_message,
    deaths_key,
    encode_result_meta,
    job_ids_in,
    jobs_from_kwargs,
    new_job_id,
    result_key,
)
from worker import preprocess
from worker.metrics import Metrics
from worker.models import LoadedModel, ModelCache

log = logging.getLogger(__name__)


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

    def run(self, requests: Sequence[RequestLike]) -> list[JobResult]:
        """Answer every job in these messages and store the answers; return them.

        At-least-once delivery means a job can come again: one already answered is skipped
        (idempotent). A job whose worker process died holding it comes back with a death
        count: it runs alone, so it can't take innocent jobs down with it, and after
        ``poison_kills`` deaths it is failed and dead-lettered instead of run again.
        """
        started = time.time()
        jobs: list[Job] = []
        results: list[JobResult] = []
        for request in requests:
            try:
                jobs.extend(jobs_from_kwargs(request.kwargs))
            except WireError as exc:
                log.error("message %s: %s", request.id, exc)
                # No job id readable: the message's own id is its job's, for a single job.
                ids = job_ids_in(request.kwargs) or [str(request.id)]
                results.extend(JobResult.failure(jid, f"malformed message: {exc}") for jid in ids)
        answered, deaths = self._history(jobs)
        fresh = [job for job in jobs if job.id not in answered]
        if answered:
            log.info("skipped %d redelivered jobs already answered", len(answered))
            counted = [deaths_key(jid) for jid in answered if jid in deaths]
            if counted:  # they died after answering: nothing to hold against them
                self.redis.delete(*counted)
        kills = self.settings.poison_kills
        poison = [job for job in fresh if deaths.get(job.id, 0) >= kills]
        suspects = [job for job in fresh if 0 < deaths.get(job.id, 0) < kills]
        if suspects and len(fresh) > 1:
            self.isolate(suspects)
        else:
            suspects = []
        held = {job.id for job in poison} | {job.id for job in suspects}
        runnable = [job for job in fresh if job.id not in held]
        results.extend(self.fail_poison(poison, deaths))
        results.extend(self.classify(runnable))
        settled = [request.id for request in requests if isinstance(request.id, str)]
        self.store(results, quiet={job.id for job in jobs if not job.notify}, settled=settled)
        self.report(fresh, results, started)
        return results

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
        # One increment per (model, version, status), not per job: a batch has few of them.
        outcomes = Counter((r.model or "", r.version or "", r.status) for r in results)
        for labels, count in outcomes.items():
            self.metrics.jobs.labels(*labels).inc(count)
        answered = {result.job_id for result in results}
        for job in jobs:
            if job.submitted_at and job.id in answered:
                self.metrics.queue_wait.observe(max(0.0, started - job.submitted_at))
                self.metrics.end_to_end.observe(max(0.0, stored - job.submitted_at))

    def _history(self, jobs: Sequence[Job]) -> tuple[set[str], dict[str, int]]:
        """Which jobs already have a result, and how often each killed a worker: one trip."""
        if not jobs:
            return set(), {}
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.mget([result_key(job.id) for job in jobs])
            pipe.mget([deaths_key(job.id) for job in jobs])
            stored, counts = pipe.execute()
        answered = {job.id for job, raw in zip(jobs, stored, strict=True) if raw is not None}
        deaths = {job.id: int(n) for job, n in zip(jobs, counts, strict=True) if n is not None}
        return answered, deaths

    def isolate(self, jobs: Sequence[Job]) -> None:
        """Send each suspect job back as a message of its own, so a poison one dies alone."""
        queue = self.settings.queue
        messages = [
            build_message([job], queue, new_job_id(), alone=True, signer=self.signer)
            for job in jobs
        ]
        ledger.push(self.redis, queue, messages, self.settings.visibility_timeout_s)
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
        """One result per job, in the jobs' order."""
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
            by_id.update((r.job_id, r) for r in self._classify_with(model, group))
        answered = [by_id[job.id] for job in jobs if job.id in by_id]
        if len(answered) != len(jobs):
            missing = [job.id for job in jobs if job.id not in by_id]
            raise AssertionError(f"batch contract broken: no result for jobs {missing}")
        return answered

    def _classify_with(self, model: LoadedModel, jobs: Sequence[Job]) -> Iterable[JobResult]:
        info = model.info
        inputs: list[np.ndarray] = []
        ready: list[Job] = []
        for job in jobs:
            try:
                inputs.append(
                    preprocess.decode(
                        job.image,
                        info,
                        self.settings.max_image_bytes,
                        self.settings.max_image_pixels,
                    )
                )
                ready.append(job)
            except InvalidImageError as exc:
                yield JobResult.failure(job, str(exc), info.name, info.version)
        if not ready:
            return
        try:
            observe = self.metrics.forward_pass if self.metrics else None
            probs = model.predict(preprocess.normalize(np.stack(inputs), info), observe)
        except Exception as exc:
            log.exception("forward pass of %s failed for %d jobs", info.key, len(ready))
            for job in ready:
                yield JobResult.failure(job, f"inference failed: {exc}", info.name, info.version)
            return
        yield from postprocess(model, ready, probs, self.settings.top_k)

    def store(
        self, results: Sequence[JobResult], quiet: Collection[str] = (),
        settled: Sequence[str] = (),
    ) -> None:  # fmt: skip
        """Store a batch's results (see :func:`store_results`)."""
        store_results(self.redis, results, self.settings.result_ttl_s, quiet, settled)


def store_results(
    client: redis.Redis, results: Sequence[JobResult], ttl_s: int,
    quiet: Collection[str] = (), settled: Sequence[str] = (), batch: bool = True,
) -> None:  # fmt: skip
    """Write every result, publish it to waiting clients and count it: one round trip.

    A result is written only if the job has none yet (SET NX): a job delivered twice keeps
    its first answer, so no one ever sees two, and the counters count each job once (written
    and counted in one script, so a process killed mid-store can't leave them apart).
    Results of ``quiet`` jobs are written but not published. The ``settled`` messages are
    struck off the ledger. ``batch``: count a batch (not for refused messages).
    """
    args: list[Any] = [ttl_s, f"{time.time():.3f}", 1 if batch else 0]
    for result in results:
        args += [
            result_key(result.job_id),
            encode_result_meta(result),
            0 if result.job_id in quiet else 1,
            1 if result.status == FAILURE else 0,
        ]
    with client.pipeline(transaction=False) as pipe:
        pipe.eval(_STORE, 1, STATS_KEY, *args)
        if results:
            pipe.delete(*(deaths_key(result.job_id) for result in results))
        ledger.settle(pipe, settled)
        pipe.execute()


# KEYS[1]: the stats hash. ARGV: ttl, now, batches, then key, meta, notify, failed per result.
_STORE = """
local done, failed = 0, 0
for i = 4, #ARGV, 4 do
  if redis.call('SET', ARGV[i], ARGV[i + 1], 'EX', tonumber(ARGV[1]), 'NX') then
    if ARGV[i + 2] == '1' then redis.call('PUBLISH', ARGV[i], ARGV[i + 1]) end
    if ARGV[i + 3] == '1' then failed = failed + 1 else done = done + 1 end
  end
end
redis.call('HINCRBY', KEYS[1], 'done', done)
redis.call('HINCRBY', KEYS[1], 'failed', failed)
if ARGV[3] == '1' then
  redis.call('HINCRBY', KEYS[1], 'batches', 1)
  redis.call('HSET', KEYS[1], 'last_batch_at', ARGV[2])
end
return done + failed
"""


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
