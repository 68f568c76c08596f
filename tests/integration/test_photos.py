"""Bulk runs over photo-sized JPEGs against real workers: bytes, ``--shrink`` and
``--shared-fs`` agree; shared paths are read only where a worker may; Redis memory stays
within the window however big the images."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from batchery.local import RedisServer, WorkerProcess
from bench.photos import make_photo
from producer.bulk import REDIS_COPIES, classify
from producer.client import Client
from producer.settings import Settings
from tests.factories import wait_until_serving

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shared folder of six 1600x1200 photos, one 4000x3000 one, a link out of it."""
    root = tmp_path_factory.mktemp("shared")
    (root / "photos").mkdir()
    for i in range(6):
        make_photo(root / "photos" / f"p{i}.jpg", seed=100 + i, size=(1600, 1200))
    make_photo(root / "big.jpg", seed=200)
    outside = tmp_path_factory.mktemp("outside")
    make_photo(outside / "o.jpg", seed=300, size=(800, 600))
    os.symlink(outside / "o.jpg", root / "photos" / "link.jpg")
    return root


@pytest.fixture(scope="module")
def reader(shared: Path) -> Iterator[tuple[RedisServer, WorkerProcess]]:
    """A worker that may read ``shared``, and takes images of at most 2 MB."""
    env = {"BATCHERY_SHARED_ROOTS": str(shared), "BATCHERY_MAX_IMAGE_BYTES": str(2 << 20)}
    with RedisServer() as server, WorkerProcess(server.url, "--concurrency", "1",
                                                env=env) as proc:  # fmt: skip
        with Client(settings=Settings(redis_url=server.url)) as client:
            wait_until_serving(client, proc)
        yield server, proc


def run_cli(url: str, *args: str) -> list[dict]:
    out = Path(args[args.index("-o") + 1])
    done = subprocess.run([sys.executable, "-m", "batchery.cli", "classify", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "BATCHERY_REDIS_URL": url})  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_bytes_shrink_and_shared_fs_give_the_same_labels(
    reader: tuple[RedisServer, WorkerProcess], shared: Path, tmp_path: Path
) -> None:
    server, _ = reader
    photos = sorted((shared / "photos").glob("p*.jpg"))
    answers = {}
    for how in ("bytes", "--shrink", "--shared-fs"):
        flags = [] if how == "bytes" else [how]
        rows = run_cli(server.url, *map(str, photos), "-o", str(tmp_path / f"{how}.jsonl"),
                       *flags)  # fmt: skip
        assert [r["status"] for r in rows] == ["SUCCESS"] * len(photos), rows
        answers[how] = [(r["label"], round(r["score"], 4)) for r in rows]
    assert answers["bytes"] == answers["--shrink"] == answers["--shared-fs"]


def test_shared_paths_are_read_only_under_the_roots(
    reader: tuple[RedisServer, WorkerProcess], shared: Path, tmp_path: Path
) -> None:
    server, _ = reader
    outside = tmp_path / "elsewhere.jpg"
    make_photo(outside, seed=400, size=(800, 600))
    inputs = [shared / "photos" / "p0.jpg", outside, shared / "photos" / "link.jpg",
              shared / "big.jpg"]  # fmt: skip
    rows = run_cli(server.url, *map(str, inputs), "-o", str(tmp_path / "rows.jsonl"),
                   "--shared-fs")  # fmt: skip
    by_path = {Path(r["path"]).name: r for r in rows}
    assert by_path["p0.jpg"]["status"] == "SUCCESS"
    assert "not under BATCHERY_SHARED_ROOTS" in by_path["elsewhere.jpg"]["error"]
    # The producer sends the link's real path, which is outside the root.
    assert "not under BATCHERY_SHARED_ROOTS" in by_path["link.jpg"]["error"]
    assert "over the limit of 2097152 bytes" in by_path["big.jpg"]["error"]  # the worker's


def test_a_link_planted_under_the_root_is_not_followed(
    reader: tuple[RedisServer, WorkerProcess], shared: Path
) -> None:
    # A message a producer did not resolve, naming the link itself: the worker refuses it.
    server, _ = reader
    with Client(settings=Settings(redis_url=server.url)) as client:
        from dataclasses import replace

        job = replace(client.job_template(), id="link-job", path=str(shared / "photos" /
                                                                    "link.jpg"))  # fmt: skip
        client.enqueue([job])
        result = client.result("link-job", timeout=60)
    assert result["status"] == "FAILURE"
    assert "symbolic link" in result["error"]


def test_a_worker_without_shared_roots_refuses_path_jobs(client: Client, shared: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    summary = classify(client, [str(shared / "photos" / "p1.jpg")], tmp_path / "r.jsonl",
                       shared_fs=True, progress=None)  # fmt: skip
    assert summary.counts == {"FAILURE": 1}
    (row,) = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert "BATCHERY_SHARED_ROOTS is not set" in row["error"]


def test_redis_memory_stays_within_the_window_whatever_the_image_size(
    client: Client, redis_server: RedisServer, tmp_path: Path
) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    for i in range(3):
        make_photo(folder / f"d{i}.jpg", seed=500 + i)
    for i in range(15):  # 18 photos of 3 to 4.5 MB, hard links to the three drawn
        os.link(folder / f"d{i % 3}.jpg", folder / f"l{i:02d}.jpg")
    largest = max(p.stat().st_size for p in folder.iterdir())
    r = redis.Redis.from_url(redis_server.url)
    baseline = int(r.info("memory")["used_memory"])
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], int(r.info("memory")["used_memory"]))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    window = 24 << 20
    try:
        summary = classify(client, [str(folder)], tmp_path / "rows.jsonl", window_bytes=window,
                           progress=None)  # fmt: skip
    finally:
        done.set()
        sampler.join()
    assert summary.counts == {"SUCCESS": 18}
    grown = peak[0] - baseline
    one_job = REDIS_COPIES * (largest * 4 // 3 + 1024)  # in base64
    print(f"\nRedis grew by at most {grown / 2**20:.1f} MiB for 18 photos of up to "
          f"{largest / 1e6:.1f} MB (window {window >> 20} MiB)")  # fmt: skip
    # The window, and the one job that may start past it, and Redis's own bookkeeping.
    assert grown <= window + one_job + (4 << 20)


def test_shrink_sends_the_model_sized_png_not_the_photo(shared: Path, tmp_path: Path) -> None:
    """What reaches Redis under --shrink is the PNG of the pixels the model sees (28x28 L for
    the default model), byte for byte what ``images.shrink`` makes: not the photo."""
    from PIL import Image

    from producer.images import shrink
    from producer.wire import PRIORITIES, queue_key, read_jobs

    photo = shared / "photos" / "p0.jpg"
    with RedisServer() as server:  # no worker: the message stays in Redis to be read
        env = {**os.environ, "BATCHERY_REDIS_URL": server.url}
        run = subprocess.Popen([sys.executable, "-m", "batchery.cli", "classify", str(photo),
                                "--shrink", "-o", str(tmp_path / "out.jsonl")],
                               env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)  # fmt: skip
        r = redis.Redis.from_url(server.url)
        key = queue_key(Settings().queue, "low")
        try:
            deadline = time.monotonic() + 60
            while not r.llen(key):
                assert run.poll() is None, run.communicate()[1]
                assert time.monotonic() < deadline, "classify pushed nothing"
                time.sleep(0.05)
        finally:
            run.terminate()
            run.communicate(timeout=60)
        [raw] = r.lrange(key, 0, -1)
        r.close()
    message = json.loads(raw)
    assert message["properties"]["priority"] == PRIORITIES["low"]
    [job], refused = read_jobs(json.loads(message["body"])[1])
    assert refused == [] and job.path is None
    data = photo.read_bytes()
    assert job.image == shrink(data, (28, 28), "L", 10 << 20, 40_000_000)
    with Image.open(io.BytesIO(job.image)) as img:
        assert (img.format, img.size, img.mode) == ("PNG", (28, 28), "L")
    assert len(job.image) < len(data) / 100
