"""``batchery bench --model mobilenet --photos N``: bulk on camera-sized JPEGs (4000x3000, 3 to
4.5 MB, ``bench.photos``) with MobileNetV2 at 224x224, every way on the same photos:

(pa) the tutorial way: a Celery task per photo, every pixel decoded, then resized;
(pb) celery-batches, flush_every=64, decoding the same way;
(pd) Batchery bulk, sending the bytes; (pd-shrink) ``--shrink``; (pd-shared) ``--shared-fs``;
(pe) the limit: in-process, decoded at reduced scale (JPEG draft) and the model, on the same
     number of threads.

Each Batchery row reports what went through Redis (its network input), the peak of Redis's
memory over its baseline, and the producer's peak RSS. The note of (pe) gives the top-1
agreement of reduced-scale decoding with full decoding on the distinct photos.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redis

from batchery.local import RedisServer, WorkerProcess
from bench.photos import full_decode, make_photos
from bench.run import Row, run_batches, run_bulk, run_tutorial, wait_ready
from producer.client import Client
from producer.registry import ModelInfo
from producer.settings import Settings

#: Photos drawn; the rest of a run's photos are hard links to them (make_photos).
DISTINCT = 60


@contextmanager
def redis_watch(url: str) -> Iterator[dict[str, int]]:
    """While inside: the peak of Redis's used memory over its value on entry, and the bytes
    Redis received (``peak``, ``received``), sampled every 5 ms."""
    r = redis.Redis.from_url(url)
    base_memory = int(r.info("memory")["used_memory"])
    base_input = int(r.info("stats")["total_net_input_bytes"])
    seen = {"peak": 0, "received": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            used = int(r.info("memory")["used_memory"]) - base_memory
            seen["peak"] = max(seen["peak"], used)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        done.set()
        sampler.join()
        seen["received"] = int(r.info("stats")["total_net_input_bytes"]) - base_input
        r.close()


def run_limit_photos(paths: list[Path], info: ModelInfo, threads: int) -> Row:
    """(pe) reduced-scale decoding and the model in-process, ``threads`` at a time."""
    from worker import preprocess
    from worker.models import load

    model = load(info, 16, threads=threads)
    model.predict(preprocess.normalize(np.zeros((16, *info.input_shape), np.uint8), info))

    def decode(path: Path) -> np.ndarray:
        return preprocess.decode(path.read_bytes(), info, 1 << 30, 1 << 30)

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        pixels = np.stack(list(pool.map(decode, paths)))
    model.predict(preprocess.normalize(pixels, info))
    seconds = time.perf_counter() - started
    return Row(f"(pe) the limit: draft decode + model in-process, {threads} threads",
               len(paths), seconds)  # fmt: skip


def agreement(paths: list[Path], info: ModelInfo) -> tuple[float, float]:
    """Top-1 agreement of reduced-scale decoding with full decoding, and the mean absolute
    pixel difference (of 255)."""
    from worker import preprocess
    from worker.models import load

    height, width, _ = info.input_shape
    fast = np.stack([preprocess.decode(p.read_bytes(), info, 1 << 30, 1 << 30) for p in paths])
    full = np.stack([np.asarray(full_decode(p.read_bytes(), (width, height), info.color_mode))
                     for p in paths])  # fmt: skip
    model = load(info, 16, threads=os.cpu_count() or 1)
    same = model.predict(preprocess.normalize(fast, info)).argmax(1) == model.predict(
        preprocess.normalize(full, info)).argmax(1)  # fmt: skip
    return float(same.mean()), float(np.abs(fast.astype(int) - full.astype(int)).mean())


def run_photos(n: int, workers: int, registry_root: Path, info: ModelInfo, workdir: Path,
               out: Callable[[str], None]) -> list[Row]:  # fmt: skip
    """Every photo row over ``n`` photos; prints each as it comes."""
    folder = workdir / "photos"
    out(f"drawing {min(n, DISTINCT)} photos of 4000x3000 (the rest hard links) ...")
    paths = make_photos(folder, n, distinct=min(n, DISTINCT))
    distinct = paths[: min(n, DISTINCT)]
    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        rate = f"{row.rate:,.1f} img/s"
        out(f"  {row.name}: {row.images} photos, {rate}{'; ' + row.note if row.note else ''}")

    env = {**os.environ, "BATCHERY_MODEL_DIR": str(registry_root),
           "BATCHERY_DEFAULT_MODEL": info.name, "BATCHERY_SHARED_ROOTS": str(folder)}  # fmt: skip
    with RedisServer() as server:
        out("(pa), (pb) ...")
        add(run_tutorial(server.url, distinct[:40], workers, info, full_decode=True))
        add(run_batches(server.url, paths[:200], workers, info, full_decode=True))
        worker = WorkerProcess(server.url, "--concurrency", str(workers), "--batch-size", "16",
                               env=env).start()  # fmt: skip
        try:
            with Client(settings=Settings(redis_url=server.url, model_dir=registry_root,
                                          default_model=info.name)) as client:  # fmt: skip
                wait_ready(lambda: client.result(client.submit(paths[0]), timeout=300)
                           is not None, "batchery worker")  # fmt: skip
            ways = [((), "(pd) Batchery bulk, bytes"),
                    (("--shrink",), "(pd-shrink) Batchery bulk, --shrink"),
                    (("--shared-fs",), "(pd-shared) Batchery bulk, --shared-fs")]  # fmt: skip
            for flags, name in ways:
                out(f"{name} ...")
                with redis_watch(server.url) as seen:
                    row, rss = run_bulk(server.url, folder, n, env, flags=flags)
                row.name = name
                row.note += (f"; {seen['received'] / 2**20:,.0f} MiB into Redis, peak Redis "
                             f"+{seen['peak'] / 2**20:,.0f} MiB, producer peak RSS "
                             f"{rss / 2**20:,.0f} MiB")  # fmt: skip
                add(row)
        finally:
            worker.stop()
    out("(pe) ...")
    limit = run_limit_photos(paths[:200], info, workers)
    agree, pixels = agreement(distinct, info)
    limit.note = (f"draft vs full decoding on {len(distinct)} distinct photos: top-1 agreement "
                  f"{agree * 100:.1f}%, mean pixel difference {pixels:.2f} of 255")  # fmt: skip
    add(limit)
    return rows
