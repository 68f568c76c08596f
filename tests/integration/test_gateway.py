"""The HTTP gateway as a client sees it: a real ``batchery serve`` process, a real redis-server
and a real worker. Every status code the API promises, keys, rate limits and slow clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from batchery.local import GatewayProcess, RedisServer, WorkerProcess, free_port
from gateway.apikeys import new_key
from producer.wire import queue_key
from tests.factories import big_rgb_jpeg, digit_paths, label_of

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DIGIT = digit_paths(1)[0]
PNG = {"Content-Type": "image/png"}


@pytest.fixture(scope="module")
def gateway(redis_server: RedisServer, worker: WorkerProcess) -> Iterator[GatewayProcess]:
    with GatewayProcess(redis_server.url) as proc:
        yield proc


@pytest.fixture
def http(gateway: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def idle() -> Iterator[tuple[RedisServer, GatewayProcess]]:
    """A gateway on a Redis no worker serves, whose queue holds one message at most."""
    with RedisServer() as server, GatewayProcess(
        server.url, env={"BATCHERY_MAX_QUEUE": "1"}
    ) as proc:  # fmt: skip
        yield server, proc


def test_one_image_as_the_body_is_accepted_and_answered(http: httpx.Client) -> None:
    response = http.post("/v1/jobs", content=DIGIT.read_bytes(), headers=PNG)
    assert response.status_code == 202
    (job,) = response.json()["jobs"]
    assert response.headers["location"] == job["location"] == f"/v1/jobs/{job['job_id']}"
    result = http.get(job["location"], params={"wait": 30}).json()
    assert result["status"] == "SUCCESS"
    assert result["label"] == label_of(DIGIT)
    assert result["job_id"] == job["job_id"]


def test_the_readmes_curl_one_liner_submits_and_waits(gateway: GatewayProcess) -> None:
    readme = (ROOT / "README.md").read_text()
    [line] = [ln[2:] for ln in readme.splitlines() if ln.startswith("$ curl ")]
    command = line.replace("http://127.0.0.1:8000", gateway.url)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, check=True)  # fmt: skip
    (job,) = json.loads(done.stdout)["jobs"]
    assert job["result"]["status"] == "SUCCESS"
    assert job["result"]["label"] == "7"  # examples/digits/7_00.png


def test_many_images_as_multipart_keep_their_order(http: httpx.Client) -> None:
    paths = digit_paths(20)
    files = [("images", (p.name, p.read_bytes(), "image/png")) for p in paths]
    response = http.post("/v1/jobs", files=files, data={"priority": "high"})
    assert response.status_code == 202
    jobs = response.json()["jobs"]
    assert [j["file"] for j in jobs] == [p.name for p in paths]
    labels = [http.get(j["location"], params={"wait": 30}).json()["label"] for j in jobs]
    assert labels == [label_of(p) for p in paths]


def test_submit_and_wait_in_one_request(http: httpx.Client) -> None:
    path = digit_paths(3)[2]
    response = http.post("/v1/jobs", params={"wait": 30, "explain": "true"},
                         content=path.read_bytes(), headers=PNG)  # fmt: skip
    assert response.status_code == 200
    (job,) = response.json()["jobs"]
    assert job["result"]["label"] == label_of(path)
    assert job["result"]["explanation"]["png"]  # explain went through the API


def test_a_jpeg_is_accepted_whatever_its_content_type_says(http: httpx.Client) -> None:
    response = http.post("/v1/jobs", params={"wait": 30}, content=big_rgb_jpeg(DIGIT),
                         headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    assert response.status_code == 200
    assert response.json()["jobs"][0]["result"]["label"] == label_of(DIGIT)


def queued(server: RedisServer) -> int:
    import redis

    r = redis.Redis.from_url(server.url)
    try:
        return sum(int(r.llen(queue_key("batchery", p))) for p in ("high", "normal", "low"))
    finally:
        r.close()


@pytest.mark.parametrize(
    ("body", "headers", "params", "code", "says"),
    [
        (b"hello", PNG, {}, 400, "not a readable image"),
        (b"", PNG, {}, 400, "empty"),
        (b"GIF89a\x01\x00\x01\x00\x80\x00\x00", PNG, {}, 415, "format GIF is not accepted"),
        (DIGIT.read_bytes(), {"Content-Type": "image/gif"}, {}, 415, "not image/gif"),
        (DIGIT.read_bytes(), {"Content-Type": "text/plain"}, {}, 415, "multipart/form-data"),
        (DIGIT.read_bytes(), PNG, {"priority": "urgent"}, 400, "priority"),
        (DIGIT.read_bytes(), PNG, {"deadline_s": "soon"}, 400, "deadline_s must be a number"),
        (DIGIT.read_bytes(), PNG, {"deadline_s": "-1"}, 400, "deadline"),
        (DIGIT.read_bytes(), PNG, {"explain": "maybe"}, 400, "explain must be true or false"),
        (DIGIT.read_bytes(), PNG, {"model": "../etc"}, 400, "model"),
        (DIGIT.read_bytes(), PNG, {"model": "no-such-model"}, 400, "no-such-model"),
        (DIGIT.read_bytes(), PNG, {"callback_url": "ftp://x/"}, 400, "webhooks"),
    ],
)
def test_refusals_are_the_producers_as_http_and_enqueue_nothing(
    idle: tuple[RedisServer, GatewayProcess], body: bytes, headers: dict[str, str],
    params: dict[str, str], code: int, says: str,
) -> None:  # fmt: skip
    server, proc = idle
    before = queued(server)
    response = httpx.post(f"{proc.url}/v1/jobs", content=body, headers=headers, params=params)
    assert response.status_code == code, response.text
    assert says in response.json()["error"]
    assert queued(server) == before


def test_one_bad_image_in_a_multipart_request_refuses_the_whole_request(
    idle: tuple[RedisServer, GatewayProcess],
) -> None:
    server, proc = idle
    before = queued(server)
    files = [("images", ("good.png", DIGIT.read_bytes(), "image/png")),
             ("images", ("bad.png", b"not an image", "image/png"))]  # fmt: skip
    response = httpx.post(f"{proc.url}/v1/jobs", files=files)
    assert response.status_code == 400
    assert "bad.png" in response.json()["error"]
    assert queued(server) == before


def test_over_the_byte_limits_is_413_and_enqueues_nothing(redis_server: RedisServer) -> None:
    big = big_rgb_jpeg(DIGIT, size=400)
    env = {"BATCHERY_MAX_IMAGE_BYTES": str(len(big) - 1), "BATCHERY_HTTP_MAX_BODY": "100000",
           "BATCHERY_QUEUE": "limits"}  # fmt: skip
    with GatewayProcess(redis_server.url, env=env) as proc:
        one = httpx.post(f"{proc.url}/v1/jobs", content=big, headers={"Content-Type": "image/jpeg"})
        assert one.status_code == 413
        assert "BATCHERY_MAX_IMAGE_BYTES" in one.json()["error"]
        files = [("images", (f"{i}.png", DIGIT.read_bytes(), "image/png")) for i in range(400)]
        many = httpx.post(f"{proc.url}/v1/jobs", files=files)
        assert many.status_code == 413
        assert "BATCHERY_HTTP_MAX_BODY" in many.json()["error"]
    assert queued_in(redis_server, "limits") == 0


def queued_in(server: RedisServer, queue: str) -> int:
    import redis

    r = redis.Redis.from_url(server.url)
    try:
        return sum(int(r.llen(queue_key(queue, p))) for p in ("high", "normal", "low"))
    finally:
        r.close()


def test_a_full_queue_is_429_with_retry_after(idle: tuple[RedisServer, GatewayProcess]) -> None:
    server, proc = idle
    while queued(server) < 1:
        assert httpx.post(f"{proc.url}/v1/jobs", content=DIGIT.read_bytes(),
                          headers=PNG).status_code == 202  # fmt: skip
    response = httpx.post(f"{proc.url}/v1/jobs", content=DIGIT.read_bytes(), headers=PNG)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert "BATCHERY_MAX_QUEUE" in response.json()["error"]
    assert queued(server) == 1


def test_cancel_is_idempotent(idle: tuple[RedisServer, GatewayProcess]) -> None:
    server, proc = idle
    import redis

    redis.Redis.from_url(server.url).delete(queue_key("batchery", "normal"))
    job = httpx.post(f"{proc.url}/v1/jobs", content=DIGIT.read_bytes(), headers=PNG).json()
    location = job["jobs"][0]["location"]
    assert httpx.get(f"{proc.url}{location}").json()["status"] == "PENDING"
    first = httpx.post(f"{proc.url}{location}/cancel")
    assert first.status_code == 200
    assert first.json()["status"] == "CANCELLED"
    again = httpx.post(f"{proc.url}{location}/cancel")
    assert again.status_code == 200
    assert again.json()["status"] == "CANCELLED"
    assert httpx.get(f"{proc.url}{location}").json()["status"] == "CANCELLED"


def test_cancelling_an_answered_job_is_409_and_keeps_its_answer(http: httpx.Client) -> None:
    job = http.post("/v1/jobs", params={"wait": 30}, content=DIGIT.read_bytes(), headers=PNG)
    location = job.json()["jobs"][0]["location"]
    refused = http.post(f"{location}/cancel")
    assert refused.status_code == 409
    assert refused.json()["status"] == "SUCCESS"
    assert http.get(location).json()["label"] == label_of(DIGIT)


def test_unknown_and_malformed_ids(http: httpx.Client) -> None:
    assert http.get("/v1/jobs/3f1e0c4e-0000-4000-8000-000000000000").status_code == 404
    assert http.post("/v1/jobs/3f1e0c4e-0000-4000-8000-000000000000/cancel").status_code == 404
    # cancelling is not deleting: the old verb is not one
    gone = http.delete("/v1/jobs/3f1e0c4e-0000-4000-8000-000000000000")
    # Starlette lists the methods from a set: their order varies from run to run.
    allowed = {method.strip() for method in gone.headers["allow"].split(",")}
    assert gone.status_code == 405 and allowed == {"GET", "HEAD"}
    assert http.get("/v1/jobs/" + "x" * 200).status_code == 400
    assert http.get("/v1/jobs/.x").status_code == 400  # the document's id pattern
    assert http.get("/v1/jobs/caf%C3%A9").status_code == 400  # printable, not ASCII
    assert http.get("/v1/jobs/abc", params={"wait": "-1"}).status_code == 400


def test_wait_answers_as_soon_as_the_result_lands(http: httpx.Client) -> None:
    job = http.post("/v1/jobs", content=DIGIT.read_bytes(), headers=PNG).json()["jobs"][0]
    started = time.monotonic()
    result = http.get(job["location"], params={"wait": 30}).json()
    took = time.monotonic() - started
    assert result["status"] == "SUCCESS"
    assert took < 5  # woken by the result, not by the end of the 30 s wait


def test_a_wait_past_the_bound_is_cut_to_it(idle: tuple[RedisServer, GatewayProcess]) -> None:
    server, proc = idle
    import redis

    redis.Redis.from_url(server.url).delete(queue_key("batchery", "normal"))
    job = httpx.post(f"{proc.url}/v1/jobs", content=DIGIT.read_bytes(), headers=PNG).json()
    location = job["jobs"][0]["location"]
    with GatewayProcess(server.url, env={"BATCHERY_HTTP_MAX_WAIT": "1"}) as short:
        started = time.monotonic()
        result = httpx.get(f"{short.url}{location}", params={"wait": 3600}, timeout=30).json()
        assert result["status"] == "PENDING"
        assert time.monotonic() - started < 3


def test_models_are_the_registry_as_the_cli_lists_it(http: httpx.Client) -> None:
    listed = subprocess.run([sys.executable, "-m", "batchery.cli", "models", "list", "--json"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    served = http.get("/v1/models").json()
    # Each version also says which live workers can serve it, by kind: this session's
    # TensorFlow worker (a heartbeat a pool process) serves every one, no lite worker is up.
    workers = [row.pop("workers") for row in served]
    assert workers[0]["full"] >= 1 and workers == [{"full": workers[0]["full"], "lite": 0}] * len(
        served
    )
    assert served == json.loads(listed)


def test_health_and_readiness(http: httpx.Client, idle: tuple[RedisServer, GatewayProcess]) -> None:
    assert http.get("/healthz").status_code == 200
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["workers"] >= 1
    no_worker = httpx.get(f"{idle[1].url}/readyz")
    assert no_worker.status_code == 503
    assert "no worker" in no_worker.json()["error"]


def test_an_unreachable_redis_is_503(tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with GatewayProcess(dead, env={"BATCHERY_CONNECT_RETRY": "0.5"}) as proc:
        post = httpx.post(f"{proc.url}/v1/jobs", content=DIGIT.read_bytes(), headers=PNG)
        assert post.status_code == 503
        assert post.headers["retry-after"] == "1"
        assert "cannot reach Redis" in post.json()["error"]
        get = httpx.get(f"{proc.url}/v1/jobs/3f1e0c4e-0000-4000-8000-000000000000")
        assert get.status_code == 503
        assert httpx.get(f"{proc.url}/readyz").status_code == 503
        assert httpx.get(f"{proc.url}/healthz").status_code == 200
    key, line = new_key("carol")
    (tmp_path / "keys").write_text(line + "\n")
    env = {"BATCHERY_CONNECT_RETRY": "0.5", "BATCHERY_API_KEYS": str(tmp_path / "keys")}
    with GatewayProcess(dead, env=env) as proc:  # the rate limiter can't reach Redis either
        post = httpx.post(f"{proc.url}/v1/jobs", content=DIGIT.read_bytes(),
                          headers={**PNG, **bearer(key)})  # fmt: skip
        assert post.status_code == 503


def test_the_openapi_schema_is_valid_and_the_docs_page_loads_offline(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    validate(schema)
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/models"} <= set(schema["paths"])
    page = http.get("/docs").text
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert asset in page
        assert http.get(asset).status_code == 200
    assert "http" not in page.replace("http-equiv", "").lower().split("<body>")[1]  # no CDN


@pytest.fixture(scope="module")
def keyed(
    redis_server: RedisServer, worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, dict[str, str]]]:
    """A gateway with four API keys, a rate of one every 5 s and bursts of 5 (a test's
    requests can't be slow enough to see a refill)."""
    keys, lines = {}, []
    for name in ("alice", "bob", "carol", "dave"):
        keys[name], line = new_key(name)
        lines.append(line)
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    path.write_text("# name:sha256\n" + "\n".join(lines) + "\n")
    env = {"BATCHERY_API_KEYS": str(path), "BATCHERY_API_RATE": "0.2",
           "BATCHERY_API_BURST": "5"}  # fmt: skip
    with GatewayProcess(redis_server.url, env=env) as proc:
        yield proc, keys


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_needed_and_jobs_are_their_owners(
    keyed: tuple[GatewayProcess, dict[str, str]],
) -> None:
    proc, keys = keyed
    url = f"{proc.url}/v1/jobs"
    missing = httpx.post(url, content=DIGIT.read_bytes(), headers=PNG)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.post(url, content=DIGIT.read_bytes(), headers={**PNG, **bearer("bk_nope")})
    assert wrong.status_code == 401
    assert httpx.get(f"{proc.url}/v1/models").status_code == 401
    mine = httpx.post(url, content=DIGIT.read_bytes(), headers={**PNG, **bearer(keys["alice"])})
    assert mine.status_code == 202
    location = f"{proc.url}{mine.json()['jobs'][0]['location']}"
    assert httpx.get(location, headers=bearer(keys["bob"])).status_code == 404
    assert httpx.post(f"{location}/cancel", headers=bearer(keys["bob"])).status_code == 404
    answer = httpx.get(location, params={"wait": 30}, headers=bearer(keys["alice"]))
    assert answer.json()["status"] == "SUCCESS"
    metrics = httpx.get(f"{proc.url}/metrics").text
    assert 'batchery_gateway_jobs_total{key="alice"}' in metrics
    assert httpx.get(f"{proc.url}/healthz").status_code == 200  # no key needed


def test_a_keys_rate_limit_answers_429_with_retry_after(
    keyed: tuple[GatewayProcess, dict[str, str]],
) -> None:
    proc, keys = keyed
    headers = bearer(keys["carol"])  # a key no other test spends
    codes = [httpx.get(f"{proc.url}/v1/models", headers=headers).status_code for _ in range(8)]
    assert codes == [200] * 5 + [429] * 3  # the burst, then nothing for 5 s
    limited = httpx.get(f"{proc.url}/v1/models", headers=headers)
    assert limited.status_code == 429 and 1 <= int(limited.headers["retry-after"]) <= 5
    assert "BATCHERY_API_RATE" in limited.json()["error"]
    # Dave's budget is his own.
    assert httpx.get(f"{proc.url}/v1/models", headers=bearer(keys["dave"])).status_code == 200
    # A request of more images than a whole burst can never pass: said so.
    files = [("images", (f"{i}.png", DIGIT.read_bytes(), "image/png")) for i in range(6)]
    too_many = httpx.post(f"{proc.url}/v1/jobs", files=files, headers=bearer(keys["dave"]))
    assert too_many.status_code == 429
    assert "BATCHERY_API_BURST" in too_many.json()["error"]


def test_slow_senders_are_timed_out(redis_server: RedisServer) -> None:
    env = {"BATCHERY_HTTP_BODY_TIMEOUT": "1"}
    with GatewayProcess(redis_server.url, env=env) as proc:
        # A body that stops coming: 408.
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b"\x89PNG")  # fmt: skip
            started = time.monotonic()
            reply = sock.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
            assert time.monotonic() - started < 5
        # Headers that stop coming, or nothing at all: the connection is closed.
        for opening in (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n", b""):
            with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
                sock.sendall(opening)
                started = time.monotonic()
                assert sock.recv(4096) == b""
                assert time.monotonic() - started < 5
        assert httpx.get(f"{proc.url}/healthz").status_code == 200


def test_no_keys_and_a_public_address_is_refused_at_start() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "batchery.cli", "serve", "--host", "0.0.0.0", "--port",
         str(free_port())],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 1
    assert "without API keys" in done.stderr and "BATCHERY_API_KEYS" in done.stderr


def test_the_gateway_exports_the_backlog_with_no_worker_running() -> None:
    # Workers scaled to zero export nothing: the gateway is the signal to scale up from.
    with RedisServer() as server, GatewayProcess(server.url) as proc:
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in digit_paths(5)]
        assert httpx.post(f"{proc.url}/v1/jobs", files=files).status_code == 202
        assert queued(server) == 1  # one message, five jobs
        metrics = httpx.get(f"{proc.url}/metrics").text
        assert 'batchery_backlog_jobs{queue="batchery"} 5.0' in metrics
        server.stop()
        metrics = httpx.get(f"{proc.url}/metrics", timeout=10).text
        assert "batchery_backlog_jobs{" not in metrics  # no stale figure once Redis is gone


# --- the request caps, the metrics and who may bind what, each shown to hold ----------------


def test_more_than_1024_images_in_one_request_is_400_and_enqueues_nothing(
    redis_server: RedisServer,
) -> None:
    queue = "many-unserved"  # no worker: what was pushed stays to be counted
    with GatewayProcess(redis_server.url, env={"BATCHERY_QUEUE": queue}) as proc:
        image = DIGIT.read_bytes()
        over = [("images", (f"{i}.png", image, "image/png")) for i in range(1025)]
        refused = httpx.post(f"{proc.url}/v1/jobs", files=over, timeout=60)
        assert refused.status_code == 400, refused.text
        assert "1024" in refused.json()["error"]
        assert queued_in(redis_server, queue) == 0
        accepted = httpx.post(f"{proc.url}/v1/jobs", files=over[:1024], timeout=60)
        assert accepted.status_code == 202, accepted.text
        assert len(accepted.json()["jobs"]) == 1024


def chunked_post(port: int, body: bytes, finish: bool) -> tuple[int, bytes]:
    """POST ``body`` as a chunked request (no Content-Length) over a raw socket: the status
    and body answered. ``finish``: send the closing chunk; without it, the gateway must
    answer from what it has read."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
        for i in range(0, len(body), 500):
            piece = body[i : i + 500]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        if finish:
            sock.sendall(b"0\r\n\r\n")
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {reply!r}"
            reply += chunk
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert b"content-length:" in head.lower(), head
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-answer"
            rest += chunk
        return int(head.split()[1]), rest[:length]


def test_a_chunked_body_over_the_cap_is_413_as_it_passes_the_cap(
    redis_server: RedisServer,
) -> None:
    photo = big_rgb_jpeg(DIGIT, size=100)  # 2 KB: the cap is exactly its size
    queue = "chunked-unserved"
    env = {"BATCHERY_HTTP_MAX_BODY": str(len(photo)), "BATCHERY_QUEUE": queue}
    with GatewayProcess(redis_server.url, env=env) as proc:
        started = time.monotonic()
        status, body = chunked_post(proc.port, photo + b"\x00", finish=False)
        assert status == 413, body
        assert json.loads(body)["error"] == (
            f"request body over the cap of {len(photo)} bytes (BATCHERY_HTTP_MAX_BODY)"
        )
        assert time.monotonic() - started < 5  # answered without the rest of the body
        assert queued_in(redis_server, queue) == 0
        status, body = chunked_post(proc.port, photo, finish=True)  # at the cap: accepted
        assert status == 202, body
        assert queued_in(redis_server, queue) == 1


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """/metrics as {(sample name, its labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }  # fmt: skip


def moved(before: dict[Any, float], after: dict[Any, float], name: str, **labels: str) -> float:
    """How far one sample moved between two scrapes."""
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_request_and_latency_metrics_count_every_request(gateway: GatewayProcess) -> None:
    before = scrape(gateway.url)
    for _ in range(3):
        ok = httpx.post(f"{gateway.url}/v1/jobs", content=DIGIT.read_bytes(), headers=PNG)
        assert ok.status_code == 202
    assert httpx.post(f"{gateway.url}/v1/jobs", content=b"hello", headers=PNG).status_code == 400
    after = scrape(gateway.url)
    post = {"route": "/v1/jobs", "method": "POST", "key": "-"}
    assert moved(before, after, "batchery_gateway_requests_total", **post, code="202") == 3
    assert moved(before, after, "batchery_gateway_requests_total", **post, code="400") == 1
    route = {"route": "/v1/jobs"}
    assert moved(before, after, "batchery_gateway_request_seconds_count", **route) == 4
    assert moved(before, after, "batchery_gateway_request_seconds_bucket", **route,
                 le="+Inf") == 4  # fmt: skip
    assert moved(before, after, "batchery_gateway_request_seconds_sum", **route) > 0
    assert moved(before, after, "batchery_gateway_jobs_total", key="-") == 3


def test_a_public_address_without_keys_needs_allow_unauthenticated(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "batchery.cli", "serve", "--host", "0.0.0.0", "--port",
         str(free_port())],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "BATCHERY_REDIS_URL": redis_server.url},
    )  # fmt: skip
    assert refused.returncode == 1 and "--allow-unauthenticated" in refused.stderr
    log = tmp_path / "gateway.log"
    with GatewayProcess(redis_server.url, "--host", "0.0.0.0", "--allow-unauthenticated",
                        log_path=log) as proc:  # fmt: skip
        submitted = httpx.post(f"{proc.url}/v1/jobs", content=DIGIT.read_bytes(), headers=PNG)
        assert submitted.status_code == 202  # no key asked for: something in front checks
        assert f"anyone who can reach 0.0.0.0:{proc.port} may submit" in log.read_text()
    _, line = new_key("erin")
    (tmp_path / "keys").write_text(line + "\n")
    with GatewayProcess(redis_server.url, "--host", "0.0.0.0",
                        env={"BATCHERY_API_KEYS": str(tmp_path / "keys")}) as proc:  # fmt: skip
        # With keys, a public address needs no flag, and every request a key.
        assert httpx.post(f"{proc.url}/v1/jobs", content=DIGIT.read_bytes(),
                          headers=PNG).status_code == 401  # fmt: skip
