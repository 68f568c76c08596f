"""Small factories for test inputs: real MNIST digits from examples/digits, in any shape."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from batchery.local import RedisServer, WorkerProcess
from producer.client import Client
from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "examples" / "digits"


def digit_paths(n: int | None = None) -> list[Path]:
    """Paths of the example digits (label first in the name), ``n`` of them spread over labels."""
    paths = sorted(DIGITS.glob("*.png"))
    if n is None:
        return paths
    # Interleave labels so a short list still has every digit.
    by_index = sorted(paths, key=lambda p: (p.stem.split("_")[1], p.stem))
    return by_index[:n]


def label_of(path: Path) -> str:
    """The true label in an example's file name."""
    return path.stem.split("_")[0]


def digit_image(path: Path) -> Image.Image:
    """An example digit as a PIL image (28x28, mode L)."""
    with Image.open(path) as img:
        return img.copy()


def encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    """An image encoded in ``fmt``."""
    out = io.BytesIO()
    img.save(out, format=fmt, **params)
    return out.getvalue()


def big_rgb_jpeg(path: Path, size: int = 56) -> bytes:
    """The digit upscaled to ``size`` x ``size``, in RGB, as a JPEG."""
    img = digit_image(path).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    return encode(img, "JPEG", quality=92)


def truncated_png(path: Path) -> bytes:
    """A real PNG cut short: its header reads fine, its end is missing."""
    data = path.read_bytes()
    return data[: len(data) // 2]


def corrupt_png(path: Path) -> bytes:
    """A real PNG whose pixel data is garbage: its structure is whole, its pixels don't decode.

    What a producer's checks can't see (they read no pixel): only the worker finds out.
    """
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    data[start + 2 : start + length] = b"\xff" * (length - 2)
    return bytes(data)


def noise_array(shape: tuple[int, ...] = (28, 28), seed: int = 0) -> np.ndarray:
    """Random uint8 pixels."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@dataclass
class Request:
    """What the batch runner reads of a celery-batches request."""

    id: str
    kwargs: Any


def wait_for(condition: Any, proc: subprocess.Popen[str], timeout: float, what: str) -> None:
    """Until ``condition()`` holds; fails if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        time.sleep(0.02)


def wait_until_serving(client: Client, worker: WorkerProcess, timeout: float = 240) -> None:
    """Submit one digit and wait for its answer: the worker has loaded its model."""
    job = client.submit(digit_paths(1)[0])
    deadline = time.monotonic() + timeout
    while client.result(job)["status"] == "PENDING":
        worker.check_alive()
        assert time.monotonic() < deadline, f"worker did not answer within {timeout:g} s"
        time.sleep(0.2)


@contextmanager
def worker_on_own_registry(tmp: Path) -> Iterator[tuple[Client, dict[str, str]]]:
    """A redis-server and a serving worker (one pool process, registry re-read every 0.2 s)
    on a copy of models/ under ``tmp``: a client, and the environment a ``batchery``
    command needs to reach both (see :func:`batchery_cli`)."""
    shutil.copytree(ROOT / "models", tmp / "models")
    env = {"BATCHERY_MODEL_DIR": str(tmp / "models"), "BATCHERY_MODEL_WATCH_S": "0.2"}
    with (
        RedisServer() as redis_server,
        WorkerProcess(
            redis_server.url, "--concurrency", "1", "--batch-size", "64", env=env
        ) as worker,
    ):
        settings = Settings(redis_url=redis_server.url, model_dir=tmp / "models")
        with Client(settings=settings) as client:
            wait_until_serving(client, worker)
            yield client, {**os.environ, **env, "BATCHERY_REDIS_URL": redis_server.url}


def batchery_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``batchery ARGS...`` run as a user would, in ``env``; its output captured."""
    return subprocess.run([sys.executable, "-m", "batchery.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB (VmHWM).

    Not ``ru_maxrss``: Linux carries that over from the parent through fork and exec, so a
    child of a big test process would never see its own peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def bomb_png(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header claims ``width`` x ``height`` gray pixels.

    A decoder that trusts it allocates width x height bytes before finding the data short:
    a decompression bomb's effect, without building one.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", rows)
        + png_chunk(b"IEND", b"")
    )
