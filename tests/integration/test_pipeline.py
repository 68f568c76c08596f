"""The core promise end to end: submit, a batched worker classifies, poll the result by id."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from celery import Celery
from PIL import Image

from producer.client import Client
from producer.registry import Registry
from producer.wire import Job, encode_message, result_key
from tests.factories import big_rgb_jpeg, corrupt_png, digit_paths, label_of, truncated_png

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def test_submit_one_and_poll_its_result(client: Client) -> None:
    path = digit_paths(1)[0]
    job_id = client.submit(path)
    result = client.result(job_id, timeout=30)
    assert result["job_id"] == job_id and result["status"] == "SUCCESS"
    assert result["label"] == label_of(path) and result["class_index"] == int(label_of(path))
    promoted = Registry(ROOT / "models").promoted("mnist-cnn")
    assert (result["model"], result["version"], result["error"]) == ("mnist-cnn", promoted, None)
    assert 0.5 < result["score"] <= 1.0 and len(result["top_k"]) == 3


def test_submit_many_classifies_the_examples_in_order(client: Client) -> None:
    paths = digit_paths()
    ids = client.submit_many(paths)
    results = client.results(ids, timeout=60)
    assert [r["job_id"] for r in results] == ids
    assert all(r["status"] == "SUCCESS" for r in results)
    right = sum(r["label"] == label_of(p) for r, p in zip(results, paths, strict=True))
    assert right >= 95, f"{right}/100 right"


def test_a_plain_celery_client_reads_the_result(client: Client, redis_server) -> None:
    job_id = client.submit(digit_paths(1)[0])
    ours = client.result(job_id, timeout=30)
    app = Celery(backend=redis_server.url, broker=redis_server.url)
    app.conf.accept_content = app.conf.result_accept_content = ["json"]
    async_result = app.AsyncResult(job_id)
    assert async_result.get(timeout=30) == ours
    assert async_result.state == "SUCCESS"


def test_a_plain_celery_client_waiting_is_woken_by_the_answer(client: Client, redis_server) -> None:
    app = Celery(backend=redis_server.url, broker=redis_server.url)
    app.conf.accept_content = app.conf.result_accept_content = ["json"]
    job_id = client.submit(digit_paths(2)[1])
    # Subscribed before the worker answers: the answer must be published, not just stored.
    assert app.AsyncResult(job_id).get(timeout=30)["job_id"] == job_id


def test_a_corrupt_image_in_the_middle_of_a_batch_fails_alone(client: Client) -> None:
    paths = digit_paths(21)
    images: list[object] = list(paths)
    images[10] = corrupt_png(paths[10])  # its structure passes the producer's check
    ids = client.submit_many(images)
    results = client.results(ids, timeout=60)
    statuses = [r["status"] for r in results]
    assert statuses == ["SUCCESS"] * 10 + ["FAILURE"] + ["SUCCESS"] * 10
    assert "cannot decode image" in results[10]["error"]


def test_a_message_that_bypassed_the_producer_fails_only_its_job(client, redis_server) -> None:
    good = Job(id="bypass-good", image=digit_paths(1)[0].read_bytes())
    bad = Job(id="bypass-bad", image=b"\x89PNG but not really")
    client._redis.lpush(client.settings.queue, encode_message([good, bad], client.settings.queue))
    got = client.results(["bypass-good", "bypass-bad"], timeout=30)
    assert [r["status"] for r in got] == ["SUCCESS", "FAILURE"]
    assert "not a readable image" in got[1]["error"]


def test_jobs_from_concurrent_submitters_share_forward_passes(client: Client) -> None:
    paths = digit_paths(64)
    ids: list[str] = []
    lock = threading.Lock()

    def submit(path: Path) -> None:
        job_id = client.submit(path)
        with lock:
            ids.append(job_id)

    threads = [threading.Thread(target=submit, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = client.results(ids, timeout=60)
    assert all(r["status"] == "SUCCESS" for r in results)
    sizes = [r["batch_size"] for r in results]
    assert max(sizes) > 1, f"64 single jobs never shared a forward pass: {sizes}"


def test_large_rgb_jpegs_classify_like_the_small_pngs(client: Client) -> None:
    paths = digit_paths(30)
    ids = client.submit_many([big_rgb_jpeg(p) for p in paths])
    results = client.results(ids, timeout=60)
    right = sum(r["label"] == label_of(p) for r, p in zip(results, paths, strict=True))
    assert right >= 28, f"{right}/30"


def test_results_expire(client: Client) -> None:
    job_id = client.submit(digit_paths(1)[0])
    client.result(job_id, timeout=30)
    assert 0 < client._redis.ttl(result_key(job_id)) <= client.settings.result_ttl_s


def run_cli(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATCHERY_REDIS_URL": redis_url}
    return subprocess.run(
        [sys.executable, "-m", "batchery.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


def test_cli_submit_then_result(redis_server, worker) -> None:
    paths = digit_paths(3)
    submitted = run_cli(redis_server.url, "submit", *map(str, paths))
    assert submitted.returncode == 0, submitted.stderr
    ids = submitted.stdout.split()
    assert len(ids) == 3
    shown = run_cli(redis_server.url, "result", *ids, "--wait", "30")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [r["job_id"] for r in rows] == ids
    assert [r["label"] for r in rows] == [label_of(p) for p in paths]


def test_cli_result_exits_non_zero_for_failed_and_pending(redis_server, worker, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(corrupt_png(digit_paths(1)[0]))
    submitted = run_cli(redis_server.url, "submit", str(broken))
    assert submitted.returncode == 0, submitted.stderr
    failed = run_cli(redis_server.url, "result", submitted.stdout.strip(), "--wait", "30")
    assert failed.returncode == 1 and json.loads(failed.stdout)["status"] == "FAILURE"
    pending = run_cli(redis_server.url, "result", "no-such-job")
    assert pending.returncode == 1 and json.loads(pending.stdout)["status"] == "PENDING"


def test_cli_refuses_a_non_image_before_enqueueing(redis_server, worker, tmp_path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    refused = run_cli(redis_server.url, "submit", str(digit_paths(1)[0]), str(text))
    assert refused.returncode == 1
    assert "notes.txt" in refused.stderr and "not a readable image" in refused.stderr
    assert refused.stdout == ""


def test_cli_refuses_a_truncated_image_naming_it(redis_server, worker, tmp_path) -> None:
    cut = tmp_path / "cut.png"
    cut.write_bytes(truncated_png(digit_paths(1)[0]))
    refused = run_cli(redis_server.url, "submit", str(cut))
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"{cut}: truncated PNG file" in refused.stderr


def test_cli_status_sees_the_worker_and_the_counts(redis_server, worker, client) -> None:
    client.result(client.submit(digit_paths(1)[0]), timeout=30)
    shown = run_cli(redis_server.url, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    # Two pool processes here, each with a heartbeat (other tests' workers may share Redis).
    assert status["workers_alive"] >= 2 and len(status["workers"]) == status["workers_alive"]
    assert status["done"] >= 1 and status["queue"] == "batchery"
    text = run_cli(redis_server.url, "status").stdout
    assert re.search(r"^workers alive  \d+ \(\S+:\d+, \S+:\d+", text, re.M), text
    # Other tests share this Redis (their dead letters too): the text says what the JSON says.
    assert f"dead letters   {status['dead_letters']}" in text and "messages waiting" in text


def test_a_job_asking_for_an_explanation_gets_its_heatmap(client: Client) -> None:
    path = digit_paths(1)[0]
    plain, explained = client.results(
        [client.submit(path), client.submit(path, explain=True)], timeout=30
    )
    assert "explanation" not in plain
    heat = explained["explanation"]
    assert explained["status"] == "SUCCESS" and heat["target"] == explained["label"]
    assert heat["method"] == "integrated-gradients" and (heat["width"], heat["height"]) == (28, 28)
    assert base64.b64decode(heat["png"]).startswith(b"\x89PNG")


def test_cli_explain_draws_each_image_beside_its_heatmap(redis_server, worker, tmp_path) -> None:
    paths = digit_paths(3)
    shown = run_cli(redis_server.url, "explain", *map(str, paths), "-o", str(tmp_path / "why"))
    assert shown.returncode == 0, shown.stderr
    written = sorted((tmp_path / "why").glob("*.explained.png"))
    assert len(written) == 3 and all("SUCCESS" in line for line in shown.stdout.splitlines())
    with Image.open(written[0]) as img:
        assert img.size == (448, 252) and img.mode == "RGB"
        pixels = np.asarray(img)
    right = pixels[:224, 224:]
    assert (right[..., 0].astype(int) - right[..., 1] > 100).any()  # red where the evidence is
