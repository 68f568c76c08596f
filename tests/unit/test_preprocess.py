from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from producer.errors import InvalidImageError
from producer.registry import Registry
from tests.factories import (
    big_rgb_jpeg,
    corrupt_png,
    digit_image,
    digit_paths,
    encode,
    truncated_png,
)
from worker import preprocess


def decode(data: bytes, info, max_bytes: int, max_pixels: int) -> np.ndarray:
    return preprocess.normalize(preprocess.decode(data, info, max_bytes, max_pixels), info)


ROOT = Path(__file__).resolve().parents[2]
INFO = Registry(ROOT / "models").get("mnist-cnn")
LIMITS = (10 * 1024 * 1024, 40_000_000)


def test_png_digit_becomes_the_models_input() -> None:
    path = digit_paths(1)[0]
    x = decode(path.read_bytes(), INFO, *LIMITS)
    assert x.shape == (28, 28, 1) and x.dtype == np.float32
    expected = np.asarray(digit_image(path), np.float32)[:, :, None] / 255.0
    assert np.allclose(x, expected)


def test_large_rgb_jpeg_comes_out_close_to_the_original() -> None:
    path = digit_paths(1)[0]
    original = decode(path.read_bytes(), INFO, *LIMITS)
    from_jpeg = decode(big_rgb_jpeg(path), INFO, *LIMITS)
    assert from_jpeg.shape == (28, 28, 1)
    assert np.abs(from_jpeg - original).mean() < 0.06


def test_transparent_background_becomes_black() -> None:
    rgba = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    x = decode(encode(rgba), INFO, *LIMITS)
    assert x.max() == 0.0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a readable image"),
        (truncated_png(digit_paths(1)[0]), "truncated PNG file"),
        (corrupt_png(digit_paths(1)[0]), "cannot decode image"),
        (encode(Image.new("L", (8, 8)), "GIF"), "GIF is not accepted"),
    ],
    ids=["empty", "garbage", "truncated", "corrupt", "gif"],
)
def test_bad_images_fail_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidImageError, match=reason):
        decode(data, INFO, *LIMITS)


def test_limits_are_enforced_before_decoding() -> None:
    big = encode(Image.new("L", (1000, 1000)))
    with pytest.raises(InvalidImageError, match="1000000 pixels is over the limit of 999999"):
        decode(big, INFO, 10**7, 999_999)
    with pytest.raises(InvalidImageError, match="over the limit of 10 bytes"):
        decode(big, INFO, 10, 10**9)


def test_decode_gives_uint8_pixels_and_normalize_scales_a_batch() -> None:
    path = digit_paths(1)[0]
    pixels = preprocess.decode(path.read_bytes(), INFO, *LIMITS)
    assert pixels.dtype == np.uint8 and pixels.shape == (28, 28, 1)
    batch = preprocess.normalize(np.stack([pixels, pixels]), INFO)
    assert batch.dtype == np.float32 and batch.shape == (2, 28, 28, 1) and batch.max() <= 1.0
