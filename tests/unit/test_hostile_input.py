"""Hostile images: bombs, truncations, other formats, and fuzzed bytes.

The producer refuses what breaks a limit before anything is enqueued; the worker's decode
checks again, refuses before allocating, and answers every input with pixels or a clear
error: no crash, no hang.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from producer.client import Client
from producer.errors import InvalidImageError
from producer.images import check_image_bytes
from producer.registry import Registry
from producer.settings import Settings
from tests.factories import bomb_png, digit_image, digit_paths, encode
from worker.preprocess import decode

ROOT = Path(__file__).resolve().parents[2]
INFO = Registry(ROOT / "models").get("mnist-cnn")
MAX_BYTES, MAX_PIXELS = 10 * 1024 * 1024, 40_000_000
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")


def digit_as(fmt: str, size: int = 28, mode: str = "L") -> bytes:
    img = digit_image(digit_paths(1)[0]).resize((size, size)).convert(mode)
    return encode(img, fmt)


SEEDS = [digit_as(fmt, size, mode) for fmt in FORMATS for size, mode in ((28, "L"), (40, "RGB"))]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_truncated_file_is_refused_by_the_producer_naming_it(fmt: str, fake_redis) -> None:
    whole = digit_as(fmt, 40, "RGB")
    client = Client(settings=Settings(), redis_client=fake_redis)
    with pytest.raises(InvalidImageError, match=rf"<{len(whole) * 2 // 3} bytes>: truncated"):
        client.submit_many([digit_paths(1)[0], whole[: len(whole) * 2 // 3]])
    assert fake_redis.llen(client.settings.queue) == 0  # not even the good one


def test_a_pixel_bomb_is_refused_before_enqueueing_naming_the_limit(tmp_path, fake_redis) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(20_000, 20_000))
    client = Client(settings=Settings(max_image_pixels=MAX_PIXELS), redis_client=fake_redis)
    with pytest.raises(InvalidImageError) as refused:
        client.submit(bomb)
    assert str(refused.value) == (
        f"{bomb}: 20000x20000 = 400000000 pixels is over the limit of 40000000 pixels "
        "(BATCHERY_MAX_IMAGE_PIXELS)"
    )
    assert fake_redis.llen(client.settings.queue) == 0


def test_the_worker_refuses_a_bomb_without_allocating_it() -> None:
    # In a fresh process, so its peak memory is its own: decoding the bomb would take 400 MB.
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from producer.errors import InvalidImageError
from producer.registry import Registry
from tests.factories import bomb_png, peak_rss_kib
from worker.preprocess import decode
info = Registry({str(ROOT / "models")!r}).get("mnist-cnn")
bomb = bomb_png(20_000, 20_000)
before = peak_rss_kib()
try:
    decode(bomb, info, {MAX_BYTES}, {MAX_PIXELS})
except InvalidImageError as exc:
    print(exc)
print(peak_rss_kib() - before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()  # fmt: skip
    assert "400000000 pixels is over the limit of 40000000 pixels" in out[0]
    print(f"\nbomb refused by the worker: peak RSS grew {int(out[1])} KiB")
    assert int(out[1]) < 20 * 1024  # KiB: the 400 MB image was never allocated


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "ICO"])
def test_formats_off_the_allow_list_are_refused(fmt: str) -> None:
    data = encode(Image.new("L", (16, 16)), fmt)
    with pytest.raises(InvalidImageError, match=f"{fmt} is not accepted"):
        check_image_bytes(data, "x", MAX_BYTES, MAX_PIXELS)
    with pytest.raises(InvalidImageError, match=f"{fmt} is not accepted"):
        decode(data, INFO, MAX_BYTES, MAX_PIXELS)


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    mode=st.sampled_from(["L", "RGB", "RGBA", "P", "1"]),
)
def test_the_producers_header_reading_agrees_with_pillow(fmt, width, height, mode) -> None:
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        mode = "RGB"
    img = Image.new(mode, (width, height))
    data = encode(img, fmt)
    assert check_image_bytes(data, "x", MAX_BYTES, MAX_PIXELS) == fmt
    assert check_image_bytes(data, "x", MAX_BYTES, width * height) == fmt
    with pytest.raises(InvalidImageError, match="over the limit"):
        check_image_bytes(data, "x", MAX_BYTES, width * height - 1) if width * height > 1 else (
            check_image_bytes(data, "x", 1, MAX_PIXELS)
        )


def answers(data: bytes) -> None:
    """Decode ``data`` as the worker does: pixels of the model's shape, or a clear error."""
    try:
        pixels = decode(data, INFO, MAX_BYTES, MAX_PIXELS)
    except InvalidImageError as exc:
        assert str(exc)
        assert len(str(exc)) < 500  # a reason, never the input echoed back
        return
    assert pixels.shape == INFO.input_shape and pixels.dtype == np.uint8


# BATCHERY_FUZZ_EXAMPLES=20000 for a longer hunt than CI's.
FUZZ = settings(
    max_examples=int(os.environ.get("BATCHERY_FUZZ_EXAMPLES", "400")),
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(data: bytes) -> None:
    answers(data)


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                   max_size=12),
    cut=st.floats(0.05, 1.0),
)  # fmt: skip
def test_fuzz_mutated_images(seed: bytes, flips: list[tuple[float, int]], cut: float) -> None:
    data = bytearray(seed)
    for where, value in flips:
        data[int(where * len(data))] = value
    answers(bytes(data[: max(1, int(cut * len(data)))]))


@FUZZ
@given(seed=st.sampled_from(SEEDS), junk=st.binary(min_size=1, max_size=64),
       where=st.floats(0, 1))  # fmt: skip
def test_fuzz_inserted_bytes(seed: bytes, junk: bytes, where: float) -> None:
    at = int(where * len(seed))
    answers(seed[:at] + junk + seed[at:])


def test_every_fuzz_seed_is_a_real_image() -> None:
    # The mutations start from images that decode: the fuzzing explores near real files.
    for data in SEEDS:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
        answers(data)


@pytest.mark.parametrize(
    ("mode", "bytes_per_pixel", "times"), [("L", 1, 1.25), ("RGB", 3, 1.5), ("RGBA", 4, 2.1)]
)
def test_decoding_the_largest_allowed_image_peaks_near_its_decoded_size(
    tmp_path, mode: str, bytes_per_pixel: int, times: float
) -> None:
    """What docs/security.md states: decoding an image at the pixel limit peaks at about its
    decoded size (RGBA: twice, Pillow resizes it premultiplied), not at several copies."""
    width, height = 8000, MAX_PIXELS // 8000
    ramp = np.add.outer(np.arange(height) // 20, np.arange(width) // 20).astype(np.uint8)
    layers = [ramp, ramp[::-1], ramp[:, ::-1], np.full_like(ramp, 200)][:bytes_per_pixel]
    pixels = layers[0] if mode == "L" else np.dstack(layers)
    path = tmp_path / "largest.png"
    Image.fromarray(pixels, mode).save(path, compress_level=1)
    del pixels, layers, ramp
    assert path.stat().st_size <= MAX_BYTES
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from producer.registry import Registry
from tests.factories import peak_rss_kib
from worker.preprocess import decode, limit_pillow
info = Registry({str(ROOT / "models")!r}).get("mnist-cnn")
limit_pillow({MAX_PIXELS})
data = open({str(path)!r}, "rb").read()
before = peak_rss_kib()
decode(data, info, {MAX_BYTES}, {MAX_PIXELS})
print(peak_rss_kib() - before)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()  # fmt: skip
    grew_mb = int(out[-1]) / 1024
    decoded_mb = bytes_per_pixel * MAX_PIXELS / 2**20
    print(f"\n{mode} {width}x{height}: peak grew {grew_mb:.0f} MiB ({decoded_mb:.0f} MiB decoded)")
    assert grew_mb < times * decoded_mb + 20


def test_pillow_itself_refuses_what_is_over_our_limit(monkeypatch) -> None:
    import warnings

    from worker.preprocess import limit_pillow

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    with warnings.catch_warnings():
        limit_pillow(100)
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
            Image.open(io.BytesIO(encode(Image.new("L", (11, 10)))))
        Image.open(io.BytesIO(encode(Image.new("L", (10, 10))))).load()  # at the limit: fine
