"""``batchery bench --capacity``: the numbers that size a deployment, measured here.

Per model (the reference CNN and MobileNetV2):

- **worker throughput**: a queue filled first (no producer running), then one worker started;
  the rate at which it drains the queue once serving, per core it runs on. Both message
  shapes: jobs as the bulk path sends them (256 to a message) and one job a message (online).
- **Redis cost per job**: commands executed (Lua's inner calls included), bytes in and out,
  and Redis CPU time, read from ``INFO`` around a run of online single jobs (64 threads,
  each submit then wait) and around a ``batchery classify`` bulk run, divided by the jobs.
  CPU time per job gives what one Redis core can carry.

And the cost of ``BATCHERY_REPLICA_ACKS=1`` (a replica on this host): online and bulk, acks
off and on, against the same primary and replica.

The table (markdown) is printed and returned; ``capacity()`` turns a target rate into workers,
Redis instances and network, from these figures (docs/benchmark.md shows a run).
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from batchery.local import RedisServer, WorkerProcess
from bench.run import make_images, model_folder, run_bulk, run_online, wait_ready
from producer.client import Client
from producer.settings import Settings
from producer.wire import STATS_KEY

REDIS_HEADROOM = 0.5  # plan one Redis for half of what its core can carry: peaks, replication


@dataclass
class RedisCost:
    """What Redis spent per job in one run."""

    jobs: int
    commands: float
    bytes_in: float
    bytes_out: float
    cpu_ms: float

    def jobs_per_redis_core(self) -> float:
        """Jobs/s one Redis core carries at this cost, flat out."""
        return 1000.0 / self.cpu_ms if self.cpu_ms else math.inf


@contextmanager
def redis_cost(url: str, jobs: int, into: list[RedisCost]) -> Iterator[None]:
    """Measure Redis's commands, bytes and CPU over the block; append them per job to ``into``."""
    r = redis.Redis.from_url(url)

    def sample() -> tuple[int, int, int, float]:
        stats, cpu = r.info("stats"), r.info("cpu")
        return (int(stats["total_commands_processed"]), int(stats["total_net_input_bytes"]),
                int(stats["total_net_output_bytes"]),
                float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]))  # fmt: skip

    before = sample()
    yield
    after = sample()
    r.close()
    commands, bytes_in, bytes_out, cpu = (a - b for a, b in zip(after, before, strict=True))
    into.append(RedisCost(jobs, commands / jobs, bytes_in / jobs, bytes_out / jobs,
                          cpu / jobs * 1000))  # fmt: skip


def drain_rate(url: str, env: dict[str, str], paths: list[Path], per_message: int,
               cores: int, batch: int) -> float:  # fmt: skip
    """Jobs/s one worker on ``cores`` cores drains from a queue filled before it starts."""
    settings = Settings(redis_url=url, chunk_size=per_message, queue_wait_s=0)
    with Client(settings=settings) as client:
        r = client.redis
        r.delete(STATS_KEY)
        for start in range(0, len(paths), 2000):
            client.submit_many(paths[start : start + 2000])
        with WorkerProcess(url, "--concurrency", str(cores), "--batch-size", str(batch),
                           env=env):  # fmt: skip
            deadline = time.monotonic() + 300
            while int(r.hget(STATS_KEY, "done") or 0) < max(16, per_message):  # serving
                if time.monotonic() > deadline:
                    raise TimeoutError("the worker did not start within 300 s")
                time.sleep(0.005)
            t0, done0 = time.perf_counter(), int(r.hget(STATS_KEY, "done") or 0)
            if done0 > len(paths) // 2:
                raise RuntimeError(f"{done0} of {len(paths)} jobs were done before the "
                                   "measure began: give it more images")  # fmt: skip
            while (done := int(r.hget(STATS_KEY, "done") or 0)) < len(paths):
                time.sleep(0.02)
            seconds = time.perf_counter() - t0
    return (done - done0) / seconds


@dataclass
class ModelCapacity:
    """One model's figures."""

    model: str
    per_core_bulk: float
    per_core_online: float
    online: RedisCost
    bulk: RedisCost


def measure_model(model: str, images: int, cores: int, workdir: Path,
                  out: Callable[[str], None]) -> ModelCapacity:  # fmt: skip
    """Worker throughput and Redis cost per job for ``model`` (see the module)."""
    folder = workdir / model
    paths = make_images(folder, images, model)
    registry, info, _ = model_folder(model, workdir)
    batch = 64 if model == "reference" else 16
    env = {**os.environ, "BATCHERY_MODEL_DIR": str(registry.root),
           "BATCHERY_DEFAULT_MODEL": info.name}  # fmt: skip
    with RedisServer() as server:
        out(f"{model}: worker drain rate, 256 jobs a message ...")
        bulk_rate = drain_rate(server.url, env, paths, 256, cores, batch)
        out(f"{model}: worker drain rate, one job a message ...")
        online_rate = drain_rate(server.url, env, paths[: max(256, len(paths) // 4)], 1,
                                 cores, batch)  # fmt: skip
    costs: list[RedisCost] = []
    with RedisServer() as server:
        settings = Settings(redis_url=server.url, model_dir=registry.root,
                            default_model=info.name)  # fmt: skip
        with WorkerProcess(server.url, "--concurrency", str(cores), "--batch-size", str(batch),
                           env=env), Client(settings=settings) as client:  # fmt: skip
            wait_ready(lambda: client.result(client.submit(paths[0]), timeout=300) is not None,
                       "batchery worker")  # fmt: skip
            online = paths[: min(len(paths), 6400 if model == "reference" else 320)]
            out(f"{model}: Redis cost of online single jobs ...")
            with redis_cost(server.url, len(online) // 64 * 64, costs):
                run_online(client, online, 64)
            out(f"{model}: Redis cost of bulk ...")
            with redis_cost(server.url, len(paths), costs):
                run_bulk(server.url, folder, len(paths), env)
    return ModelCapacity(model, bulk_rate / cores, online_rate / cores, costs[0], costs[1])


def answered(client: Client, job: str) -> Callable[[], bool]:
    """A probe: whether ``job`` has its answer."""
    return lambda: client.result(job)["status"] != "PENDING"


@dataclass
class AckCost:
    """Online and bulk runs with replica acks off and on, alternated, each ``rounds`` times."""

    online: dict[int, list[Any]]
    bulk: dict[int, list[float]]


def measure_replica_acks(images: int, cores: int, workdir: Path, out: Callable[[str], None],
                         rounds: int = 3) -> AckCost:  # fmt: skip
    """The reference model's online and bulk runs against a primary with one replica, with
    BATCHERY_REPLICA_ACKS 0 and 1 in turn (0, 1, 0, 1, ...: this host's drift and noise fall
    on both alike)."""
    folder = workdir / "acks"
    paths = make_images(folder, images, "reference")
    registry, info, _ = model_folder("reference", workdir)
    online: dict[int, list[Any]] = {0: [], 1: []}
    bulk: dict[int, list[float]] = {0: [], 1: []}
    with RedisServer() as primary, RedisServer(args=("--replicaof", "127.0.0.1",
                                                     str(primary.port))):  # fmt: skip
        for _ in range(rounds):
            for acks in (0, 1):
                env = {**os.environ, "BATCHERY_MODEL_DIR": str(registry.root),
                       "BATCHERY_DEFAULT_MODEL": info.name,
                       "BATCHERY_REPLICA_ACKS": str(acks)}  # fmt: skip
                settings = replace(Settings.from_env(env), redis_url=primary.url)
                with WorkerProcess(primary.url, "--concurrency", str(cores), "--batch-size",
                                   "64", env=env), Client(settings=settings) as client:  # fmt: skip
                    wait_ready(answered(client, client.submit(paths[0])), "batchery worker")
                    out(f"replica acks {acks}: online, bulk ...")
                    online[acks].append(run_online(client, paths[:6400], 64))
                    bulk[acks].append(run_bulk(primary.url, folder, len(paths), env)[0].rate)
    return AckCost(online, bulk)


def capacity(target: float, per_core: float, cost: RedisCost) -> dict[str, float]:
    """What ``target`` jobs/s needs at these figures: worker cores, Redis instances (each
    planned at REDIS_HEADROOM of its core), and network into and out of Redis."""
    per_redis = cost.jobs_per_redis_core() * REDIS_HEADROOM
    return {
        "worker_cores": math.ceil(target / per_core),
        "jobs_per_redis": per_redis,
        "redis_instances": math.ceil(target / per_redis),
        "workers_per_redis": per_redis / per_core,
        "mbit_in": target * cost.bytes_in * 8 / 1e6,
        "mbit_out": target * cost.bytes_out * 8 / 1e6,
    }


def table(models: list[ModelCapacity], acks: AckCost | None, cores: int) -> str:
    """The capacity table, then the replica-ack cost, as markdown."""
    lines = [
        f"Measured on this host: {cores} cores; worker rates per core of a {cores}-process worker.",
        "",
        "| | jobs/s per worker core | Redis commands / job | Redis bytes in / out per job "
        "| Redis CPU per job | jobs/s one Redis core carries |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in models:
        for shape, rate, cost in (("bulk", m.per_core_bulk, m.bulk),
                                  ("online", m.per_core_online, m.online)):  # fmt: skip
            lines.append(
                f"| {m.model}, {shape} | {rate:,.0f} | {cost.commands:.1f} | "
                f"{cost.bytes_in:,.0f} / {cost.bytes_out:,.0f} | {cost.cpu_ms * 1000:.1f} µs | "
                f"{cost.jobs_per_redis_core():,.0f} |"
            )
    if acks is not None:
        lines += ["", "| BATCHERY_REPLICA_ACKS | online img/s | online p50 / p99 | bulk img/s |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for n in (0, 1):
            rows = acks.online[n]
            rates = [row.rate for row in rows]
            p50 = statistics.median(row.percentile(50) or 0 for row in rows)
            p99 = statistics.median(row.percentile(99) or 0 for row in rows)
            lines.append(f"| {n} | {_spread(rates)} | {p50:.1f} / {p99:.1f} ms | "
                         f"{_spread(acks.bulk[n])} |")  # fmt: skip
        lines.append(f"(median of {len(acks.bulk[0])} alternated runs each, range in brackets)")
    return "\n".join(lines)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f} to {max(values):,.0f})"


def run_capacity(images: int, out: Callable[[str], None] = print,
                 models: tuple[str, ...] = ("reference", "mobilenet")) -> str:  # fmt: skip
    """Measure every figure and print the table."""
    cores = os.cpu_count() or 1
    workdir = Path(tempfile.mkdtemp(prefix="batchery-capacity-"))
    measured: list[ModelCapacity] = []
    acks = None
    try:
        for model in models:
            # MobileNetV2 runs ~50 times slower: 6 bulk messages of 256 are enough to time.
            n = images if model == "reference" else max(1536, images // 13)
            measured.append(measure_model(model, n, cores, workdir, out))
            out(table(measured[-1:], None, cores))
        if "reference" in models:
            acks = measure_replica_acks(images, cores, workdir, out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = table(measured, acks, cores)
    out(text)
    return text
