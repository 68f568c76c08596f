"""``make soak``: many jobs for many minutes through workers that keep being killed.

A steady stream of jobs (``--jobs`` over ``--minutes``) goes through two workers of one pool
process each, against a redis-server with appendonly on. Every ``--kill-every`` seconds a
random SIGKILL lands: a pool process (its worker forks another), or a whole worker (a new
one is started); every ``--redis-every`` seconds Redis is restarted. At the end it prints
what was lost (must be 0), what was computed twice (answered once: the second answer was
discarded), job latency (submit to answer seen) and the longest recovery: the longest time
with jobs outstanding and no answer arriving.

    python -m bench.soak [--jobs 100000] [--minutes 10]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

import numpy as np

from batchery.local import RedisServer, WorkerProcess
from producer.client import Client
from producer.settings import Settings
from producer.wire import STATS_KEY, SUCCESS

ROOT = Path(__file__).resolve().parent.parent
VISIBILITY_S = 10


@dataclass
class Tally:
    """What the soak saw."""

    submitted: dict[str, float] = field(default_factory=dict)
    answered: dict[str, float] = field(default_factory=dict)
    #: Submitted, not yet answered, oldest first (the collector looks at the head).
    pending: dict[str, None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    failed: list[str] = field(default_factory=list)
    breaks: list[str] = field(default_factory=list)
    longest_stall_s: float = 0.0


def start_worker(url: str, queue: str) -> WorkerProcess:
    env = {"BATCHERY_VISIBILITY_TIMEOUT": str(VISIBILITY_S), "BATCHERY_QUEUE": queue}
    return WorkerProcess(url, "--concurrency", "1", env=env).start()


def pool_children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def run(jobs: int, minutes: float, kill_every: float, redis_every: float, seed: int) -> int:
    rng = random.Random(seed)
    images = sorted((ROOT / "examples" / "digits").glob("*.png"))
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"batchery-soak-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(args=("--appendonly", "yes", "--appendfsync", "everysec"),
                         workdir=workdir)  # fmt: skip
    server.start()
    queue = "soak"
    settings = Settings(redis_url=server.url, queue=queue, connect_retry_s=120,
                        visibility_timeout_s=VISIBILITY_S)  # fmt: skip
    client = Client(settings=settings)
    workers = [start_worker(server.url, queue) for _ in range(2)]
    tally = Tally()
    stop = threading.Event()
    try:
        first = client.submit(images[0])
        client.result(first, timeout=300)
        client.redis.hset(STATS_KEY, mapping={"done": 0, "failed": 0, "computed_twice": 0})
        print(f"soak: {jobs} jobs over {minutes:g} min, a kill every {kill_every:g} s, "
              f"a Redis restart every {redis_every:g} s", flush=True)  # fmt: skip

        def submit() -> None:
            per_tick, tick = max(1, round(jobs / (minutes * 60) * 0.1)), 0.1
            started, sent = time.monotonic(), 0
            while sent < jobs and not stop.is_set():
                n = min(per_tick, jobs - sent)
                batch = [images[(sent + i) % len(images)] for i in range(n)]
                now = time.monotonic()
                ids = client.submit_many(batch)
                with tally.lock:
                    for job_id in ids:
                        tally.submitted[job_id] = now
                        tally.pending[job_id] = None
                sent += n
                time.sleep(max(0.0, started + (sent / per_tick) * tick - time.monotonic()))

        def chaos() -> None:
            next_redis = time.monotonic() + redis_every
            while not stop.wait(kill_every):
                if time.monotonic() >= next_redis:
                    server.stop()
                    time.sleep(1)
                    server.start(timeout=60)
                    next_redis += redis_every
                    tally.breaks.append("redis restart")
                    continue
                i = rng.randrange(len(workers))
                proc = workers[i].process
                children = pool_children(proc.pid) if proc else []
                if children and rng.random() < 0.5:
                    os.kill(rng.choice(children), signal.SIGKILL)
                    tally.breaks.append("pool process SIGKILL")
                elif proc is not None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    workers[i] = start_worker(server.url, queue)
                    tally.breaks.append("worker SIGKILL + new worker")

        threads = [threading.Thread(target=submit), threading.Thread(target=chaos, daemon=True)]
        for thread in threads:
            thread.start()
        last_answer = time.monotonic()
        deadline = time.monotonic() + minutes * 60 + 300
        while time.monotonic() < deadline:
            with tally.lock:
                waiting = list(islice(tally.pending, 5000))
            if not waiting and not threads[0].is_alive():
                break
            found = client.retrying(partial(client.fetch, waiting)) if waiting else {}
            now = time.monotonic()
            for job_id, result in found.items():
                tally.answered[job_id] = now
                with tally.lock:
                    tally.pending.pop(job_id, None)
                if result["status"] != SUCCESS:
                    tally.failed.append(job_id)
            if found or not waiting:
                tally.longest_stall_s = max(tally.longest_stall_s, now - last_answer)
                last_answer = now
            time.sleep(0.05)
        stop.set()
        threads[0].join()
        stats = client.retrying(lambda: client.redis.hgetall(STATS_KEY))
    finally:
        stop.set()
        for worker in workers:
            worker.stop(timeout=30)
        server.stop()
    lost = [j for j in tally.submitted if j not in tally.answered]
    latencies = np.array([tally.answered[j] - tally.submitted[j] for j in tally.answered])
    twice = int(stats.get(b"computed_twice", 0))
    # Answered once: the workers counted exactly one stored answer per job sent (a second
    # answer is discarded and counted as computed twice, never as done).
    counted = int(stats.get(b"done", 0)) + int(stats.get(b"failed", 0))
    once = counted == len(tally.submitted)
    counts: dict[str, int] = {}
    for what in tally.breaks:
        counts[what] = counts.get(what, 0) + 1
    print(f"jobs {len(tally.submitted)}, answered {len(tally.answered)}, lost {len(lost)}, "
          f"failed {len(tally.failed)}, answers counted {counted} "
          f"({'answered once' if once else 'NOT answered once'}), computed twice {twice} "
          "(the second answer discarded)")  # fmt: skip
    print("breaks: " + ", ".join(f"{n} {what}" for what, n in counts.items()))
    if len(latencies):
        print(f"latency p50 {np.percentile(latencies, 50) * 1000:.0f} ms, "
              f"p99 {np.percentile(latencies, 99) * 1000:.0f} ms, "
              f"max {latencies.max():.1f} s")  # fmt: skip
    print(f"longest recovery (no answer while jobs were waiting): {tally.longest_stall_s:.1f} s")
    return 1 if lost or tally.failed or not once else 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.soak``."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill-every", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--redis-every", type=float, default=120.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run(args.jobs, args.minutes, args.kill_every, args.redis_every, args.seed)


if __name__ == "__main__":
    sys.exit(main())
