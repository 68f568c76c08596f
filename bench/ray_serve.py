"""(f) Ray Serve with ``@serve.batch`` over HTTP: the peer most users would pick instead.

The same model, loaded and called the same way (``worker.models.load``: the compiled
forward pass) and the same preprocessing (``worker.preprocess``), in ``workers`` replicas,
each batching requests with ``@serve.batch`` up to the same batch size. Measured like (c):
64 concurrent HTTP clients, each posting one image and waiting for its answer, and (f1)
one request at a time. Importing this module needs ``pip install -e '.[ray]'``; without
it ``batchery bench`` leaves (f) out.
"""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from batchery.local import free_port
from bench.run import Row, concurrently, one_at_a_time
from producer.registry import ModelInfo
from producer.settings import Settings

ROUTE = "/classify"
#: The image limits Batchery's workers apply by default, applied here too.
LIMITS = Settings()


@serve.deployment
class Classifier:
    """One replica: the model loaded once, requests gathered into batches."""

    def __init__(self, model_dir: str, batch_size: int) -> None:
        from worker.models import load

        self.info = ModelInfo.from_dir(Path(model_dir))
        self.model = load(self.info, batch_size, threads=1)
        self.classify.set_max_batch_size(batch_size)  # type: ignore[attr-defined]

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def classify(self, images: list[bytes]) -> list[dict[str, Any]]:
        import numpy as np

        from producer.errors import InvalidImageError
        from worker import preprocess

        answers: list[dict[str, Any]] = [{} for _ in images]
        decoded, where = [], []
        for i, data in enumerate(images):
            try:
                decoded.append(preprocess.decode(data, self.info, LIMITS.max_image_bytes,
                                                 LIMITS.max_image_pixels))  # fmt: skip
                where.append(i)
            except InvalidImageError as exc:
                answers[i] = {"status": "FAILURE", "error": str(exc)}
        if decoded:
            probs = self.model.predict(preprocess.normalize(np.stack(decoded), self.info))
            for i, row in zip(where, probs, strict=True):
                best = int(row.argmax())
                answers[i] = {"status": "SUCCESS", "label": self.info.labels[best],
                              "score": float(row[best])}  # fmt: skip
        return answers

    async def __call__(self, request: Any) -> dict[str, Any]:
        answer: dict[str, Any] = await self.classify(await request.body())
        return answer


def post(conn: http.client.HTTPConnection, data: bytes) -> dict[str, Any]:
    """One request on a kept-alive connection; the answer."""
    conn.request("POST", ROUTE, body=data, headers={"Content-Type": "application/octet-stream"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"Ray Serve answered {response.status}: {body[:200]!r}")
    answer: dict[str, Any] = json.loads(body)
    return answer


def run(paths: list[Path], info: ModelInfo, batch: int, workers: int) -> list[Row]:
    """(f1) one request at a time and (f) 64 concurrent clients, against ``workers`` replicas."""
    port = free_port()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = Classifier.options(  # type: ignore[attr-defined]
            num_replicas=workers, ray_actor_options={"num_cpus": 1},
            max_ongoing_requests=256,
        ).bind(str(info.file.parent), batch)  # fmt: skip
        serve.run(app, route_prefix=ROUTE, name="batchery-bench")
        data = [p.read_bytes() for p in paths]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        if post(conn, data[0])["status"] != "SUCCESS":
            raise RuntimeError("Ray Serve did not classify a digit")
        n = 200 if len(data) >= 1000 else 30
        lone = one_at_a_time("(f1) Ray Serve, one request at a time", n,
                             lambda: post(conn, data[0]))  # fmt: skip
        conn.close()
        return [lone, _concurrent(port, data, 64)]
    finally:
        serve.shutdown()
        ray.shutdown()


def _concurrent(port: int, data: list[bytes], clients: int) -> Row:
    per_client = len(data) // clients

    def client(k: int) -> list[float]:
        mine = []
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            for j in range(per_client):
                at = time.perf_counter()
                if post(conn, data[k * per_client + j])["status"] != "SUCCESS":
                    raise RuntimeError("Ray Serve failed a digit")
                mine.append(time.perf_counter() - at)
        finally:
            conn.close()
        return mine

    seconds, latencies = concurrently(clients, client)
    return Row(f"(f) Ray Serve @serve.batch, {clients} concurrent clients", len(latencies),
               seconds, latencies)  # fmt: skip
