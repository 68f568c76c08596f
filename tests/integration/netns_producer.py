"""The producer host of the many-hosts test (``test_many_hosts.py``), run inside its namespace.

``python -m tests.integration.netns_producer JOBS WORKERS``: waits until WORKERS worker
processes beat, submits JOBS digits in bursts, waits for every answer, and reports on
stdout, one JSON object a line: ``ready``, ``burst`` (after each burst: jobs submitted, messages
still queued), ``report``.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from typing import Any

from batchery.status import collect
from producer.client import Client
from producer.settings import Settings
from producer.wire import STATS_KEY, queue_key, result_key
from tests.factories import digit_paths, label_of

BURST = 2500  # jobs in one call (messages of 256): a queue each worker holds some of a while
PAUSE_S = 2.0  # between bursts: a run long enough to cut a host and plug it back in


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def main(jobs: int, workers: int, wait_s: float = 180.0) -> None:
    client = Client(settings=Settings.from_env())
    deadline = time.monotonic() + 300
    while collect(client)["workers_alive"] < workers:
        if time.monotonic() > deadline:
            raise SystemExit(f"fewer than {workers} workers beat after 300 s")
        time.sleep(0.2)
    say(event="ready")
    paths = digit_paths()
    images = [paths[i % len(paths)] for i in range(jobs)]
    ids: list[str] = []
    submitted_at: list[float] = []
    for burst in range(0, jobs, BURST):
        ids += client.submit_many(images[burst : burst + BURST])
        submitted_at += [time.time()] * (len(ids) - len(submitted_at))
        queued = int(client.redis.llen(queue_key(client.settings.queue, "normal")))
        say(event="burst", submitted=len(ids), queued=queued)
        time.sleep(PAUSE_S)
    results = client.results(ids, timeout=wait_s)
    stats = {k.decode(): v.decode() for k, v in client.redis.hgetall(STATS_KEY).items()}
    # When each answer was stored: the result meta's date_done (the dict has no time).
    metas = [
        raw
        for start in range(0, len(ids), 1000)
        for raw in client.redis.mget([result_key(i) for i in ids[start : start + 1000]])
    ]
    answered_at = [
        datetime.fromisoformat(json.loads(raw)["date_done"]).timestamp() if raw else None
        for raw in metas
    ]
    say(
        event="report",
        statuses=[r["status"] for r in results],
        right=sum(r.get("label") == label_of(p) for r, p in zip(results, images, strict=True)),
        submitted_at=submitted_at,
        answered_at=answered_at,
        stats=stats,
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
