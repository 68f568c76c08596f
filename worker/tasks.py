"""The batched task: many messages in, one forward pass per model version, one result per job.

The batch contract: every job in the batch gets exactly one result, and a failure is recorded
against every job it touched (a broken image fails only its own job; a failed forward pass
fails the jobs that were in it).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import redis

from producer.errors import BatcheryError, InvalidImageError, WireError
from producer.settings import Settings
from producer.wire import (
    FAILURE,
    STATS_KEY,
    SUCCESS,
    Job,
    JobResult,
    TopK,
    encode_result_meta,
    job_ids_in,
    jobs_from_kwargs,
    result_key,
)
from worker import preprocess
from worker.models import LoadedModel, ModelCache

log = logging.getLogger(__name__)


class RequestLike(Protocol):
    """What the runner needs of a celery-batches ``SimpleRequest``."""

    id: str
    kwargs: Any


class BatchRunner:
    """Runs batches in one worker process: decode, predict, postprocess, store."""

    def __init__(self, settings: Settings, models: ModelCache, redis_client: redis.Redis) -> None:
        self.settings = settings
        self.models = models
        self.redis = redis_client

    def run(self, requests: Sequence[RequestLike]) -> list[JobResult]:
        """Answer every job in these messages and store the answers; return them."""
        jobs: list[Job] = []
        results: list[JobResult] = []
        for request in requests:
            try:
                jobs.extend(jobs_from_kwargs(request.kwargs))
            except WireError as exc:
                log.error("message %s: %s", request.id, exc)
                ids = job_ids_in(request.kwargs)
                results.extend(JobResult.failure(jid, f"malformed message: {exc}") for jid in ids)
        results.extend(self.classify(jobs))
        self.store(results, quiet={job.id for job in jobs if not job.notify})
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
            probs = model.predict(preprocess.normalize(np.stack(inputs), info))
        except Exception as exc:
            log.exception("forward pass of %s failed for %d jobs", info.key, len(ready))
            for job in ready:
                yield JobResult.failure(job, f"inference failed: {exc}", info.name, info.version)
            return
        yield from postprocess(model, ready, probs, self.settings.top_k)

    def store(self, results: Sequence[JobResult], quiet: Collection[str] = ()) -> None:
        """Write every result, publish it to waiting clients and count it: one pipeline.

        Results of ``quiet`` jobs are written but not published.
        """
        if not results:
            return
        ttl = self.settings.result_ttl_s
        failed = sum(1 for r in results if r.status == FAILURE)
        with self.redis.pipeline(transaction=False) as pipe:
            for result in results:
                key, meta = result_key(result.job_id), encode_result_meta(result)
                pipe.set(key, meta, ex=ttl)
                if result.job_id not in quiet:
                    pipe.publish(key, meta)
            pipe.hincrby(STATS_KEY, "done", len(results) - failed)
            pipe.hincrby(STATS_KEY, "failed", failed)
            pipe.hincrby(STATS_KEY, "batches", 1)
            pipe.hset(STATS_KEY, "last_batch_at", f"{time.time():.3f}")
            pipe.execute()


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
