"""Small factories for test inputs: real MNIST digits from examples/digits, in any shape."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from producer.client import Client
from producer.local import WorkerProcess

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
    """A real PNG cut short: its header reads fine, its pixels do not decode."""
    data = path.read_bytes()
    return data[: len(data) // 2]


def noise_array(shape: tuple[int, ...] = (28, 28), seed: int = 0) -> np.ndarray:
    """Random uint8 pixels."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@dataclass
class Request:
    """What the batch runner reads of a celery-batches request."""

    id: str
    kwargs: Any


def wait_until_serving(client: Client, worker: WorkerProcess, timeout: float = 240) -> None:
    """Submit one digit and wait for its answer: the worker has loaded its model."""
    job = client.submit(digit_paths(1)[0])
    deadline = time.monotonic() + timeout
    while client.result(job)["status"] == "PENDING":
        worker.check_alive()
        assert time.monotonic() < deadline, f"worker did not answer within {timeout:g} s"
        time.sleep(0.2)
