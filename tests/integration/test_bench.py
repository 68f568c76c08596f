"""`batchery bench`'s machinery on a few images: every way runs and answers every image.

Speed is reported by `batchery bench`, never asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from batchery.local import RedisServer
from bench.run import (
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
    bulk, producer_rss = run_bulk(redis_server.url, images[0].parent.parent, len(images), {})
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
