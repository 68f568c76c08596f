"""`batchery bench`'s machinery on a few images: every way runs and answers every image.

Speed is reported by `batchery bench`, never asserted here.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from batchery.local import RedisServer
from bench.run import (
    DIGITS,
    Row,
    make_images,
    run_batches,
    run_bulk,
    run_explained,
    run_limit,
    run_limit_decoded,
    run_lone,
    run_mixed,
    run_online,
    run_tutorial,
    worker_peak_rss,
)
from bench.suite import table
from producer.client import Client
from producer.registry import Registry
from producer.settings import Settings
from producer.wire import STATS_KEY
from tests.factories import digit_paths

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("bench") / "images", 120, "reference")


def test_every_way_answers_every_image(redis_server, worker, client: Client, images) -> None:
    info = Registry(Settings().model_dir).get("mnist-cnn")
    rows = [
        run_tutorial(redis_server.url, images[:10], 1, info),
        run_batches(redis_server.url, images[:100], 1, info),
        run_lone(client, images, 10),
        run_online(client, images, 8),
    ]
    started = time.perf_counter()
    bulk, producer_rss = run_bulk(redis_server.url, images[0].parent.parent, len(images), {})
    # Timed from the run: classify's start to its exit, within the call's own wall time.
    assert 0 < time.perf_counter() - started - bulk.seconds < 0.5
    lone = rows[2]
    assert lone.seconds == pytest.approx(sum(lone.latencies or []))  # each job's own time
    assert max(rows[3].latencies or []) <= rows[3].seconds
    rows += [bulk, run_limit(images, info, 64, threads=1), run_limit_decoded(images, info, 64, 2)]
    assert [r.images for r in rows] == [10, 100, 10, 120, 120, 120, 120]
    assert rows[-1].name.startswith("(e) the limit: read + decode + forward")
    # The producer's CPU, read from its own rusage: a figure, not a constant.
    cpu = float(bulk.note.split("producer CPU ")[1].split(" µs")[0])
    assert 10 < cpu < 1_000_000, bulk.note
    assert all(r.seconds > 0 and r.rate > 0 for r in rows)
    assert len(rows[0].latencies or []) == 10 and len(rows[1].latencies or []) == 100
    assert 20_000_000 < producer_rss < 1_000_000_000
    assert worker_peak_rss(worker) > 100_000_000  # TensorFlow and a model are loaded
    explained = run_explained(client, images[:20])
    assert explained.images == 20 and "explaining costs" in explained.note
    mixed = run_mixed(client, redis_server.url, images[0].parent.parent, len(images), {},
                      "high", bulk, rows[2])  # fmt: skip
    assert mixed.name.startswith("(m)") and mixed.images >= 1 and "of (d) alone" in mixed.note
    assert f"idle p99 {rows[2].percentile(99):.1f} ms" in mixed.note
    rows.append(mixed)
    text = table(rows, "reference", 1)
    assert text.count("\n| (") == 8 and "| way | images | img/s | p50 ms | p99 ms |" in text


def test_the_http_row_answers_every_image_through_a_gateway(redis_server, worker, images) -> None:
    from bench import gateway

    row = gateway.run(redis_server.url, {}, images[:64], clients=8)
    assert row.name.startswith("(g)") and row.images == 64
    assert len(row.latencies or []) == 64 and row.rate > 0


def test_mobilenet_images_are_224_rgb_jpegs(tmp_path) -> None:
    from PIL import Image

    paths = make_images(tmp_path, 3, "mobilenet")
    with Image.open(paths[0]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (224, 224))


def test_ray_serve_answers_every_image(images) -> None:
    from bench.ray_serve import run

    info = Registry(Settings().model_dir).get("mnist-cnn")
    lone, concurrent = run(images[:64], info, 64, 1)
    assert (lone.images, concurrent.images) == (30, 64)
    assert len(concurrent.latencies or []) == 64 and concurrent.rate > 0
    assert lone.name.startswith("(f1)") and concurrent.name.startswith("(f)")


def test_the_optimised_rows_use_a_private_registry(tmp_path, images) -> None:
    from bench.run import model_folder

    shipped = Registry(Settings().model_dir)
    before = shipped.versions("mnist-cnn")
    registry, info, fast = model_folder("reference", tmp_path, "dynamic-int8")
    assert fast is not None and fast.format == "litert" and registry.root == tmp_path / "models"
    assert fast.meta["optimized"]["source_version"] == info.version
    row = run_limit(images, fast, 64, threads=1)
    assert row.name.startswith("(e') the limit, dynamic-int8 LiteRT") and row.rate > 0
    assert shipped.versions("mnist-cnn") == before  # nothing published into the repo's


def test_the_capacity_figures_are_measured_not_assumed(redis_server, client: Client,
                                                       images) -> None:  # fmt: skip
    from bench.capacity import RedisCost, drain_rate, redis_cost, table

    costs: list[RedisCost] = []
    with redis_cost(redis_server.url, 64, costs):
        run_online(client, images[:64], 8)
    [cost] = costs
    # Each job: at least its push, its pop, its result write and its read; its image in, its
    # result out; some Redis CPU.
    assert 4 < cost.commands < 100
    assert cost.bytes_in > 300 and cost.bytes_out > 100 and cost.cpu_ms > 0
    with RedisServer() as empty:  # no other worker takes from its queue
        rate = drain_rate(empty.url, {}, images * 25, 256, cores=1, batch=64)
    assert rate > 0
    text = table([], None, 1)
    assert "jobs/s per worker core" in text


# --- each row is measured from its run, not assumed ------------------------------------------
#
# The row functions are driven with their measurements replaced by known figures (a run's
# seconds, Redis's traffic, a worker's rate), or with a real Redis fed a known load; the
# figures they print and return must follow from those, so a figure written in fails.


class _NoWorker:
    """Stands in for WorkerProcess where the figures under test come from elsewhere."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.process = None

    def start(self) -> _NoWorker:
        return self

    def stop(self) -> None:
        pass

    def __enter__(self) -> _NoWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _feed(url: str, commands: int, size: int, prefix: str = "feed") -> None:
    """A known load on Redis: ``commands`` SETs of ``size`` bytes each."""
    import redis

    r = redis.Redis.from_url(url)
    for i in range(commands):
        r.set(f"{prefix}:{i}", b"x" * size)
    r.close()


def test_the_photo_rows_report_their_runs_figures(tmp_path, monkeypatch) -> None:
    from bench import photo_rows

    n = 12
    digits = sorted(DIGITS.glob("*.png"))

    def make_photos(folder: Path, count: int, distinct: int) -> list[Path]:
        folder.mkdir(parents=True)
        for i in range(count):
            shutil.copyfile(digits[i % len(digits)], folder / f"photo_{i:06d}.png")
        return sorted(folder.glob("*.png"))

    seconds = {(): 6.0, ("--shrink",): 3.0, ("--shared-fs",): 1.5}
    mib = {(): 5, ("--shrink",): 2, ("--shared-fs",): 1}

    def run_bulk(url, folder, count, env, flags=()):
        # What this way sends through Redis, and keeps there (just under 1 MiB a value, so
        # each takes 1 MiB of Redis's memory); then a pause for redis_watch's 5 ms sampler.
        _feed(url, mib[flags], 2**20 - 100, prefix=" ".join(flags))
        time.sleep(0.05)
        return Row("(d)", count, seconds[flags], note="classify's summary"), (40 + mib[flags]) << 20

    monkeypatch.setattr(photo_rows, "make_photos", make_photos)
    monkeypatch.setattr(photo_rows, "run_tutorial", lambda _, p, *a, **k: Row("(pa)", len(p), 8))
    monkeypatch.setattr(photo_rows, "run_batches", lambda _, p, *a, **k: Row("(pb)", len(p), 4))
    monkeypatch.setattr(photo_rows, "WorkerProcess", _NoWorker)
    monkeypatch.setattr(photo_rows, "wait_ready", lambda probe, what: None)
    monkeypatch.setattr(photo_rows, "run_bulk", run_bulk)
    monkeypatch.setattr(photo_rows, "run_limit_photos", lambda p, i, t: Row("(pe)", len(p), 0.25))
    monkeypatch.setattr(photo_rows, "agreement", lambda p, i: (0.875, 1.25))
    info = Registry(Settings().model_dir).get("mnist-cnn")
    printed: list[str] = []
    rows = photo_rows.run_photos(n, 1, Settings().model_dir, info, tmp_path, printed.append)
    assert [(r.name[:12], r.images, r.rate) for r in rows] == [
        ("(pa)", n, n / 8.0), ("(pb)", n, n / 4.0),
        ("(pd) Batcher", n, n / 6.0), ("(pd-shrink) ", n, n / 3.0), ("(pd-shared) ", n, n / 1.5),
        ("(pe)", n, n / 0.25),
    ]  # fmt: skip
    for row, flags in zip(rows[2:5], seconds, strict=True):
        sent = mib[flags]
        found = re.fullmatch(r"classify's summary; (\d+) MiB into Redis, peak Redis \+(\d+) MiB, "
                             r"producer peak RSS (\d+) MiB", row.note)  # fmt: skip
        assert found, row.note
        into, peak, rss = map(int, found.groups())
        assert into == sent and sent <= peak <= sent + 2 and rss == 40 + sent, row.note
        line = f"  {row.name}: {n} photos, {n / seconds[flags]:,.1f} img/s; {row.note}"
        assert line in printed
    assert rows[5].note == (f"draft vs full decoding on {n} distinct photos: top-1 agreement "
                            "87.5%, mean pixel difference 1.25 of 255")  # fmt: skip


def test_capacity_rates_and_redis_costs_are_measured(tmp_path, monkeypatch) -> None:
    from bench import capacity

    monkeypatch.setattr(capacity, "drain_rate",
                        lambda url, env, paths, per_message, cores, batch:
                        8000.0 if per_message == 256 else 600.0)  # fmt: skip
    monkeypatch.setattr(capacity, "WorkerProcess", _NoWorker)
    monkeypatch.setattr(capacity, "wait_ready", lambda probe, what: None)

    # Online: 7 commands of 500 bytes a job; bulk: 3 of 2,000.
    def run_online(client: Client, paths: list[Path], threads: int) -> None:
        _feed(client.settings.redis_url, 7 * (len(paths) // 64 * 64), 500)

    def run_bulk(url: str, folder: Path, n: int, env: dict[str, str]) -> None:
        _feed(url, 3 * n, 2000)

    monkeypatch.setattr(capacity, "run_online", run_online)
    monkeypatch.setattr(capacity, "run_bulk", run_bulk)
    m = capacity.measure_model("reference", 128, 2, tmp_path, lambda line: None)
    assert (m.per_core_bulk, m.per_core_online) == (4000.0, 300.0)
    for cost, commands, size in ((m.online, 7, 500), (m.bulk, 3, 2000)):
        # Plus INFO's own reads (a few, over 128 jobs) and each SET's framing (<60 bytes).
        assert commands <= cost.commands < commands + 0.1, cost
        assert commands * size < cost.bytes_in < commands * (size + 60), cost
        assert cost.cpu_ms > 0 and commands * 5 < cost.bytes_out < commands * 20, cost
    text = capacity.table([m], None, 2)
    assert f"| reference, bulk | 4,000 | {m.bulk.commands:.1f} | " in text
    assert f"| reference, online | 300 | {m.online.commands:.1f} | " in text
    assert f"{m.bulk.bytes_in:,.0f} / {m.bulk.bytes_out:,.0f}" in text
    assert f"{m.online.cpu_ms * 1000:.1f} µs | {m.online.jobs_per_redis_core():,.0f} |" in text


def test_capacity_drain_rate_is_the_workers_rate(monkeypatch) -> None:
    """A stand-in worker answers 20 jobs every 20 ms (at most 1,000 jobs/s); drain_rate must
    report the rate it saw, from Redis's done counter."""
    import threading

    import redis

    from bench import capacity

    class Paced(_NoWorker):
        def __init__(self, url: str, *args: object, **kwargs: object) -> None:
            super().__init__()
            self.r, self.stopped = redis.Redis.from_url(url), threading.Event()
            self.thread = threading.Thread(target=self.answer)

        def answer(self) -> None:
            while not self.stopped.wait(0.02):
                self.r.hincrby(STATS_KEY, "done", 20)

        def __enter__(self) -> Paced:
            self.thread.start()
            return self

        def __exit__(self, *exc: object) -> None:
            self.stopped.set()
            self.thread.join()

    monkeypatch.setattr(capacity, "WorkerProcess", Paced)
    with RedisServer() as server:
        rate = capacity.drain_rate(server.url, {}, digit_paths() * 20, 1, cores=1, batch=1)
    assert 700 < rate <= 1000, rate


def test_capacity_scales_the_measured_figures() -> None:
    """The README's plan for 100,000 jobs/s follows from its table's figures."""
    from bench.capacity import RedisCost, capacity

    plan = capacity(100_000, 4299, RedisCost(1, 2.1, 2240, 1106, cpu_ms=0.0192))
    assert plan["worker_cores"] == 24 and plan["redis_instances"] == 4
    assert round(plan["jobs_per_redis"], -3) == 26_000 and round(plan["workers_per_redis"]) == 6
    assert round(plan["mbit_in"] / 1000, 1) == 1.8 and round(plan["mbit_out"] / 1000, 1) == 0.9


def test_the_replica_ack_cost_is_measured_with_acks_off_and_on(monkeypatch) -> None:
    from bench import capacity

    online = {0: iter([1000.0, 1200.0, 1100.0]), 1: iter([800.0, 900.0, 850.0])}
    bulk = {0: iter([5000.0, 5400.0, 5200.0]), 1: iter([4000.0, 4600.0, 4400.0])}

    def run_online(client: Client, paths: list[Path], threads: int) -> Row:
        acks = client.settings.replica_acks
        rate = next(online[acks])
        return Row("(c)", 100, 100 / rate, latencies=[0.01 * (1 + acks), 0.02 * (1 + acks)])

    def run_bulk(url: str, folder: Path, n: int, env: dict[str, str]) -> tuple[Row, int]:
        return Row("(d)", 100, 100 / next(bulk[int(env["BATCHERY_REPLICA_ACKS"])])), 0

    monkeypatch.setattr(capacity, "WorkerProcess", _NoWorker)
    monkeypatch.setattr(capacity, "wait_ready", lambda probe, what: None)
    monkeypatch.setattr(capacity, "run_online", run_online)
    monkeypatch.setattr(capacity, "run_bulk", run_bulk)
    # The replica has just started: the first push with acks waits for its sync.
    monkeypatch.setenv("BATCHERY_REPLICA_ACK_TIMEOUT", "30")
    with tempfile.TemporaryDirectory() as workdir:
        acks = capacity.measure_replica_acks(8, 1, Path(workdir), lambda line: None, rounds=3)
    text = capacity.table([], acks, 1)
    assert "| 0 | 1,100 (1,000 to 1,200) | 15.0 / 19.9 ms | 5,200 (5,000 to 5,400) |" in text
    assert "| 1 | 850 (800 to 900) | 30.0 / 39.8 ms | 4,400 (4,000 to 4,600) |" in text
    assert "(median of 3 alternated runs each" in text


def test_the_sized_rows_are_its_runs(monkeypatch, capsys) -> None:
    from bench import sized

    calls = {"bulk": 0, "lone": 0}

    def run_bulk(url, folder, n, env, cwd, cli="batchery.cli"):
        assert cli == "batchery.cli"  # this checkout's own command
        calls["bulk"] += 1
        return Row("(d)", n, n / (100.0 * calls["bulk"]), note=f"bulk call {calls['bulk']}"), 0

    def run_lone(client, paths, n):
        calls["lone"] += 1
        return Row("(c1)", n, 1.0, latencies=[0.001 * calls["lone"]] * n)

    def run_mixed(client, url, folder, n, env, urgent, alone, idle):
        return Row("(m)", 3, 0.3, latencies=[0.1], note=f"of {alone.rate:,.0f} img/s alone")

    class Idle:
        def close(self) -> None:
            pass

    monkeypatch.setattr(sized, "serving", lambda *a, **k: (_NoWorker(), Idle()))
    monkeypatch.setattr(sized, "run_bulk", run_bulk)
    monkeypatch.setattr(sized, "run_lone", run_lone)
    monkeypatch.setattr(sized, "run_mixed", run_mixed)
    monkeypatch.setattr(sized, "run_limit_decoded", lambda paths, *a: Row("(e)", len(paths), 0.5))
    sized.main(["--images", "5", "--workers", "1", "--rounds", "1"])
    printed = capsys.readouterr().out
    assert "(d) bulk, this, round 1: 100 img/s; bulk call 1" in printed
    assert "(c1) lone job on the idle worker, this, round 1: p50 1.00 ms, p99 1.00 ms" in printed
    assert "(e), round 1: 10 img/s" in printed
    assert "budget 25 ms: idle p50 2.0 p99 2.0 ms; bulk alone 200 img/s; mixed p50 100.0 " \
           "p99 100.0 ms, of 200 img/s alone" in printed  # fmt: skip
    assert "budget 0 ms: idle p50 3.0 p99 3.0 ms; bulk alone 300 img/s;" in printed
    assert calls == {"bulk": 3, "lone": 3}
    sized.main(["--images", "5", "--workers", "1", "--rounds", "1", "--no-mixed"])
    assert "budget" not in capsys.readouterr().out and calls == {"bulk": 4, "lone": 4}


def test_a_revision_before_the_house_runs_its_own_command(tmp_path) -> None:
    """``--against 03f60f7``: its worker and classify are producer.cli, not this batchery."""
    from bench.sized import ROOT, cli_of

    assert cli_of(ROOT) == "batchery.cli"
    (tmp_path / "producer").mkdir()
    (tmp_path / "producer" / "cli.py").write_text("")
    assert cli_of(tmp_path) == "producer.cli"
