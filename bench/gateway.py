"""(g) Batchery over HTTP: the same 64 concurrent clients as (c) and (f), through
``batchery serve``.

Each client keeps one connection and, per image, sends one request, ``POST /v1/jobs?wait=60``
with the image as the body: it returns with the answer, as Ray Serve's (f) does. The gateway
runs as its own process beside the same worker (c) used.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path

from batchery.local import GatewayProcess
from bench.run import Row, concurrently


def post(conn: http.client.HTTPConnection, data: bytes) -> dict[str, object]:
    """Submit one image and wait for its answer, on a kept-alive connection."""
    conn.request("POST", "/v1/jobs?wait=60", body=data,
                 headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"the gateway answered {response.status}: {body[:200]!r}")
    (job,) = json.loads(body)["jobs"]
    result: dict[str, object] = job["result"]
    return result


def run(url: str, env: dict[str, str], paths: list[Path], clients: int = 64) -> Row:
    """(g): ``clients`` concurrent HTTP clients through one gateway process."""
    data = [p.read_bytes() for p in paths]
    per_client = len(data) // clients
    with GatewayProcess(url, "--loglevel", "warning", env=env) as gateway:
        warm = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
        post(warm, data[0])
        warm.close()

        def client(k: int) -> list[float]:
            mine = []
            conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
            try:
                for j in range(per_client):
                    at = time.perf_counter()
                    if post(conn, data[k * per_client + j])["status"] != "SUCCESS":
                        raise RuntimeError("the gateway failed a job")
                    mine.append(time.perf_counter() - at)
            finally:
                conn.close()
            return mine

        seconds, latencies = concurrently(clients, client)
    return Row(f"(g) Batchery over HTTP (batchery serve), {clients} concurrent clients",
               len(latencies), seconds, latencies, "one POST ?wait= a job")  # fmt: skip
