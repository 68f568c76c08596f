"""PNG by libspng (pyspng), everything else by Pillow: the same pixels either way.

Every PNG colour type and bit depth the worker accepts, interlaced or not, with and without a
tRNS chunk, is decoded by both decoders and brought to the models' sizes and modes: the pixels
must be identical. PNGs Pillow cannot write (a tRNS colour key on grey or RGB, 16-bit RGB,
low bit depths, Adam7) are written here, chunk by chunk.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable
from functools import partial

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from producer import images
from producer.errors import InvalidImageError
from producer.images import _decode_pillow, _decode_png_spng, decode_to_size
from tests.factories import corrupt_png, digit_image, digit_paths, encode

LIMITS = 10 * 1024 * 1024, 40_000_000
MAX_PIXELS = LIMITS[1]
#: What the models see: 28x28 grey digits, 224x224 RGB photos, and a plain downscale.
TARGETS = [((28, 28), "L"), ((224, 224), "RGB"), ((16, 12), "RGB"), ((16, 12), "L")]
#: Adam7's passes: first column and row, then column and row steps.
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2))  # fmt: skip
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def scanlines(samples: np.ndarray, depth: int, filters: bool) -> bytes:
    """Rows of samples (HxWxC) packed at ``depth`` bits, each after its filter byte: 0 (none),
    or with ``filters`` each row's own of 0, 1 (sub) and 2 (up)."""
    step = max(1, samples.shape[2] * depth // 8)  # bytes a pixel, for the sub filter
    height = samples.shape[0]
    if height == 0 or samples.shape[1] == 0:
        return b""
    flat = samples.reshape(height, -1).astype(np.int64)
    if depth == 16:
        rows = flat.astype(">u2").view(np.uint8).reshape(height, -1)
    elif depth == 8:
        rows = flat.astype(np.uint8)
    else:
        per = 8 // depth
        padded = np.pad(flat, ((0, 0), (0, -flat.shape[1] % per))).reshape(height, -1, per)
        rows = (padded << (depth * np.arange(per - 1, -1, -1))).sum(axis=2).astype(np.uint8)
    out, previous = [], np.zeros_like(rows[0])
    for y, row in enumerate(rows):
        kind = y % 3 if filters else 0
        if kind == 1:  # sub: each byte less the byte one pixel to its left
            left = np.concatenate([np.zeros(step, np.uint8), row[:-step]])
            encoded = row - left
        elif kind == 2:  # up: each byte less the byte above it
            encoded = row - previous
        else:
            encoded = row
        out.append(bytes([kind]) + encoded.astype(np.uint8).tobytes())
        previous = row
    return b"".join(out)


def png(
    samples: np.ndarray,
    colour: int,
    depth: int,
    *,
    palette: bytes | None = None,
    trns: bytes | None = None,
    interlace: bool = False,
    filters: bool = True,
) -> bytes:
    """A PNG of ``samples`` (HxW or HxWxC sample values), written chunk by chunk."""
    if samples.ndim == 2:
        samples = samples[:, :, None]
    height, width = samples.shape[:2]
    if interlace:
        raw = b"".join(scanlines(samples[y::dy, x::dx], depth, filters)
                       for x, y, dx, dy in ADAM7)  # fmt: skip
    else:
        raw = scanlines(samples, depth, filters)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, int(interlace))
    parts = [b"\x89PNG\r\n\x1a\n", chunk(b"IHDR", ihdr)]
    if palette is not None:
        parts.append(chunk(b"PLTE", palette))
    if trns is not None:
        parts.append(chunk(b"tRNS", trns))
    parts += [chunk(b"IDAT", zlib.compress(raw, 6)), chunk(b"IEND", b"")]
    return b"".join(parts)


def noise(shape: tuple[int, ...], top: int, seed: int) -> np.ndarray:
    """Sample values: a gradient with noise on it, in 0..``top``."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, top, shape[1])[None, :]
    if len(shape) == 3:
        ramp = ramp[:, :, None]
    return np.clip(rng.normal(ramp, top / 6 + 1, shape), 0, top).round().astype(np.int64)


def keyed_samples(shape: tuple[int, ...], depth: int, seed: int) -> tuple[np.ndarray, tuple]:
    """Samples and a colour key that a block of them equals; at 16 bits, other pixels share
    the key's high byte (only a 16-bit comparison tells them apart)."""
    top = (1 << depth) - 1
    samples = noise(shape, top, seed)
    key = samples[1, 2].copy() if samples.ndim == 2 else samples[1, 2, :].copy()
    samples[3:9, 4:12] = key
    if depth == 16:
        samples[10:14, 4:12] = key ^ 1  # same high byte, not the key
    return samples, tuple(int(v) for v in np.atleast_1d(key))


def grey_png(depth: int, key: bool, interlace: bool, size=(37, 23), seed: int = 1) -> bytes:
    shape = (size[1], size[0])
    if key:
        samples, k = keyed_samples(shape, depth, seed)
        return png(samples, 0, depth, trns=struct.pack(">H", k[0]), interlace=interlace)
    return png(noise(shape, (1 << depth) - 1, seed), 0, depth, interlace=interlace)


def rgb_png(depth: int, key: bool, interlace: bool, size=(37, 23), seed: int = 2) -> bytes:
    shape = (size[1], size[0], 3)
    if key:
        samples, k = keyed_samples(shape, depth, seed)
        return png(samples, 2, depth, trns=struct.pack(">3H", *k), interlace=interlace)
    return png(noise(shape, (1 << depth) - 1, seed), 2, depth, interlace=interlace)


def alpha_png(colour: int, depth: int, interlace: bool, size=(37, 23), seed: int = 3) -> bytes:
    samples = noise((size[1], size[0], CHANNELS[colour]), (1 << depth) - 1, seed)
    samples[::4, :, -1] = 0  # fully transparent rows: their colour must not show
    return png(samples, colour, depth, interlace=interlace)


def palette_png(depth: int, trns: str, interlace: bool, size=(37, 23), seed: int = 4) -> bytes:
    rng = np.random.default_rng(seed)
    entries = min(1 << depth, 200)
    palette = rng.integers(0, 256, entries * 3, dtype=np.uint8).tobytes()
    indices = rng.integers(0, entries, (size[1], size[0]))
    alphas = {
        "none": None,
        "one": b"\xff\x00" + b"\xff" * (entries - 2),  # Pillow keeps the one index
        "alphas": rng.integers(0, 256, max(1, entries - 1), dtype=np.uint8).tobytes(),
    }
    return png(indices, 3, depth, palette=palette, trns=alphas[trns], interlace=interlace)


def pillow_png(mode: str, **params: object) -> bytes:
    """A PNG Pillow writes (its own filters and compression), from a real digit."""
    digit = digit_image(digit_paths(1)[0]).resize((45, 31))
    img = digit.convert("RGB") if mode in ("RGB", "RGBA", "P") else digit
    if mode == "RGBA":
        img = Image.merge("RGBA", [*img.split(), digit.point(lambda v: 255 - v)])
    elif mode == "LA":
        img = Image.merge("LA", [digit, digit.point(lambda v: 255 - v)])
    elif mode == "P":
        img = img.quantize(16)
    elif mode == "I;16":
        img = Image.fromarray(np.asarray(digit).astype(np.uint16) * 257)
    elif mode != "L":
        img = img.convert(mode)
    return encode(img, "PNG", **params)


CASES: dict[str, Callable[[], bytes]] = {}
for _il in (False, True):
    _sfx = "-adam7" if _il else ""
    for _d in (1, 2, 4, 8, 16):
        CASES[f"grey{_d}{_sfx}"] = partial(grey_png, _d, False, _il)
        CASES[f"grey{_d}-trns{_sfx}"] = partial(grey_png, _d, True, _il)
    for _d in (8, 16):
        CASES[f"rgb{_d}{_sfx}"] = partial(rgb_png, _d, False, _il)
        CASES[f"rgb{_d}-trns{_sfx}"] = partial(rgb_png, _d, True, _il)
        CASES[f"grey-alpha{_d}{_sfx}"] = partial(alpha_png, 4, _d, _il)
        CASES[f"rgba{_d}{_sfx}"] = partial(alpha_png, 6, _d, _il)
    for _d in (1, 2, 4, 8):
        for _t in ("none", "one", "alphas"):
            CASES[f"palette{_d}-{_t}{_sfx}"] = partial(palette_png, _d, _t, _il)
# Large enough for Pillow's reduce before the filter (a factor of 3 to 28x28).
CASES["big-rgb-trns"] = partial(rgb_png, 8, True, False, size=(301, 203))
CASES["big-grey16-adam7"] = partial(grey_png, 16, False, True, size=(301, 203))
CASES["big-palette-alphas"] = partial(palette_png, 8, "alphas", False, size=(301, 203))
for _mode in ("1", "L", "LA", "RGB", "RGBA", "P", "I;16"):
    CASES[f"pillow-{_mode}"] = partial(pillow_png, _mode)
CASES["pillow-P-transparency"] = partial(pillow_png, "P", transparency=3)
CASES["pillow-L-transparency"] = partial(pillow_png, "L", transparency=0)
CASES["pillow-RGB-transparency"] = partial(pillow_png, "RGB", transparency=(0, 0, 0))


def both(data: bytes, size: tuple[int, int], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """``data`` decoded by libspng and by Pillow."""
    spng = _decode_png_spng(data, size, mode)
    pillow = _decode_pillow(data, size, mode, MAX_PIXELS)
    assert spng.size == pillow.size == size and spng.mode == pillow.mode == mode
    return np.asarray(spng), np.asarray(pillow)


@pytest.mark.parametrize("name", sorted(CASES))
def test_libspng_and_pillow_give_the_same_pixels(name: str) -> None:
    data = CASES[name]()
    with Image.open(io.BytesIO(data)) as img:
        own = img.size
    for size, mode in [*TARGETS, (own, "L"), (own, "RGB")]:
        spng, pillow = both(data, size, mode)
        assert np.array_equal(spng, pillow), (name, size, mode)


def test_the_cases_cover_every_png_kind() -> None:
    kinds = set()
    for make in CASES.values():
        data = make()
        kinds.add((data[25], data[24], data[28], images._png_chunks(data).trns is not None))
    assert {(c, d) for c, d, _, _ in kinds} == {
        (0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4),
        (3, 8), (4, 8), (4, 16), (6, 8), (6, 16)}  # fmt: skip
    assert {(c, d, i) for c, d, i, t in kinds if t} >= {
        (c, d, i) for c, d in ((0, 1), (0, 8), (0, 16), (2, 8), (2, 16), (3, 8)) for i in (0, 1)
    }


@pytest.mark.parametrize("decoder", ["spng", "pillow"])
def test_a_16_bit_ramp_is_scaled_not_clipped(decoder: str) -> None:
    ramp = np.tile(np.arange(256) * 257, (4, 1))  # 0, 257, ..., 65535: 8-bit i is 16-bit 257 i
    data = png(ramp, 0, 16)
    decode = _decode_png_spng if decoder == "spng" else (
        lambda d, s, m: _decode_pillow(d, s, m, MAX_PIXELS))  # fmt: skip
    grey = np.asarray(decode(data, (256, 4), "L"))
    assert np.array_equal(grey, np.tile(np.arange(256), (4, 1)))  # v >> 8
    assert (grey == 255).mean() < 0.01  # Pillow's convert("L") made 99.6% of it 255
    rgb = np.asarray(decode(data, (256, 4), "RGB"))
    assert np.array_equal(rgb, np.repeat(grey[:, :, None], 3, axis=2))
    assert np.asarray(decode(data, (28, 28), "L")).std() > 60  # spread over 0..255


@pytest.mark.parametrize(
    "data",
    [png(np.array([[200, 50, 200]]), 0, 8, trns=struct.pack(">H", 50)),
     png(np.array([[[9, 99, 250], [10, 100, 250], [9, 99, 250]]]), 2, 8,
         trns=struct.pack(">3H", 10, 100, 250)),
     png(np.array([[[2313, 2313, 2313], [2314, 2314, 2314], [2313, 2313, 2313]]]), 2, 16,
         trns=struct.pack(">3H", 2314, 2314, 2314)),
     png(np.array([[3, 2, 3]]), 0, 2, trns=struct.pack(">H", 2)),
     png(np.array([[1, 0, 1]]), 0, 1, trns=struct.pack(">H", 0))],
    ids=["grey8", "rgb8", "rgb16", "grey2", "grey1"],
)  # fmt: skip
def test_a_colour_keyed_pixel_comes_out_black(data: bytes) -> None:
    for decode in (_decode_png_spng, lambda d, s, m: _decode_pillow(d, s, m, MAX_PIXELS)):
        grey = np.asarray(decode(data, (3, 1), "L"))
        assert grey[0, 1] == 0 and grey[0, 0] == grey[0, 2] > 0
        rgb = np.asarray(decode(data, (3, 1), "RGB"))
        assert (rgb[0, 1] == 0).all() and (rgb[0, 0] > 0).any()


def test_a_key_on_16_bits_is_compared_on_16_bits() -> None:
    # 2313 and 2314 share their high byte (9): only the second one is the key.
    data = png(np.array([[2313, 2314, 2313]]), 0, 16, trns=struct.pack(">H", 2314))
    assert np.asarray(decode_to_size(data, (3, 1), "L", *LIMITS)).tolist() == [[9, 0, 9]]
    assert np.asarray(_decode_pillow(data, (3, 1), "L", MAX_PIXELS)).tolist() == [[9, 0, 9]]


def test_decode_to_size_decodes_pngs_with_libspng(monkeypatch) -> None:
    calls: list[str | None] = []
    load = images.pyspng.load

    def counting(data: bytes, fmt: str | None = None) -> np.ndarray:
        calls.append(fmt)
        return load(data, fmt)

    monkeypatch.setattr(images.pyspng, "load", counting)
    digit = digit_paths(1)[0].read_bytes()
    pixels = decode_to_size(digit, (28, 28), "L", *LIMITS)
    assert calls == ["L"]
    assert np.array_equal(np.asarray(pixels), np.asarray(digit_image(digit_paths(1)[0])))
    decode_to_size(encode(Image.new("RGB", (40, 30)), "JPEG"), (28, 28), "L", *LIMITS)
    decode_to_size(encode(Image.new("RGB", (40, 30)), "WEBP"), (28, 28), "L", *LIMITS)
    assert calls == ["L"]  # other formats: Pillow


def test_what_libspng_refuses_goes_to_pillow(monkeypatch) -> None:
    def refuses(data: bytes, fmt: str | None = None) -> np.ndarray:
        raise RuntimeError("pyspng: could not decode image: some reason")

    digit = digit_paths(1)[0].read_bytes()
    expected = np.asarray(decode_to_size(digit, (28, 28), "L", *LIMITS))
    monkeypatch.setattr(images.pyspng, "load", refuses)
    assert np.array_equal(np.asarray(decode_to_size(digit, (28, 28), "L", *LIMITS)), expected)


def test_a_decoders_error_reads_the_same_whichever_met_it() -> None:
    data = corrupt_png(digit_paths(1)[0])
    with pytest.raises(images._SpngRefused):
        _decode_png_spng(data, (28, 28), "L")
    with pytest.raises(InvalidImageError) as by_pillow:
        _decode_pillow(data, (28, 28), "L", MAX_PIXELS)
    with pytest.raises(InvalidImageError) as refused:
        decode_to_size(data, (28, 28), "L", *LIMITS)
    assert str(refused.value) == str(by_pillow.value)
    assert str(refused.value).startswith("cannot decode image: ")


def test_checks_before_decoding_are_unchanged() -> None:
    data = png(np.zeros((30, 40)), 0, 8)
    with pytest.raises(InvalidImageError, match="1200 pixels is over the limit of 1199"):
        decode_to_size(data, (28, 28), "L", 10**6, 1199)
    with pytest.raises(InvalidImageError, match="over the limit of 10 bytes"):
        decode_to_size(data, (28, 28), "L", 10, 10**6)
    with pytest.raises(InvalidImageError, match="truncated PNG file"):
        decode_to_size(data[:-12], (28, 28), "L", *LIMITS)


@pytest.mark.parametrize("chunk_type", [b"tRNS", b"IDAT"])
def test_a_corrupted_chunk_is_refused_as_pillow_refuses_it(chunk_type: bytes) -> None:
    # libspng, as pyspng calls it, checks no CRC (nor zlib's checksum): ours does, and
    # Pillow gives its verdict, as it did before libspng.
    data = bytearray(png(noise((10, 10), 255, 0), 0, 8, trns=b"\x00\x07"))
    data[data.index(chunk_type) + 6] ^= 0x01  # one bit of the chunk's data: its CRC is wrong
    with pytest.raises(images._SpngRefused, match=f"bad CRC in the {chunk_type!r} chunk"):
        _decode_png_spng(bytes(data), (28, 28), "L")
    with pytest.raises(InvalidImageError) as by_pillow:
        _decode_pillow(bytes(data), (28, 28), "L", MAX_PIXELS)
    with pytest.raises(InvalidImageError) as refused:
        decode_to_size(bytes(data), (28, 28), "L", *LIMITS)
    assert str(refused.value) == str(by_pillow.value)


# BATCHERY_FUZZ_EXAMPLES=20000 for a longer hunt than CI's (as in test_hostile_input).
FUZZ = settings(
    max_examples=int(os.environ.get("BATCHERY_FUZZ_EXAMPLES", "400")),
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
SEEDS = [CASES[name]() for name in (
    "grey8", "grey2-trns-adam7", "grey16-trns", "rgb8-trns", "rgb16-trns-adam7", "grey-alpha16",
    "rgba8-adam7", "palette8-alphas", "palette4-one-adam7", "pillow-L", "pillow-RGB")]  # fmt: skip
IEND = chunk(b"IEND", b"")


def answers(data: bytes, size: tuple[int, int], mode: str) -> None:
    """An image of ``size`` in ``mode``, or :class:`InvalidImageError`: nothing else. And
    what libspng decodes, Pillow decodes to the same pixels: no file is read two ways."""
    try:
        img = decode_to_size(data, size, mode, *LIMITS)
    except InvalidImageError as exc:
        assert 0 < len(str(exc)) < 500
        return
    assert img.size == size and img.mode == mode
    try:
        spng = _decode_png_spng(data, size, mode)
    except images._SpngRefused:
        return  # decode_to_size's image was Pillow's
    assert np.array_equal(np.asarray(spng), np.asarray(img))
    assert np.array_equal(np.asarray(_decode_pillow(data, size, mode, MAX_PIXELS)), np.asarray(img))


@FUZZ
@given(
    seed=st.sampled_from(SEEDS),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                   max_size=12),
    cut=st.floats(0.05, 1.0),
    end=st.booleans(),
    target=st.sampled_from(TARGETS[:2]),
)  # fmt: skip
def test_fuzz_mutated_and_cut_pngs(seed: bytes, flips, cut: float, end: bool, target) -> None:
    data = bytearray(seed)
    for where, value in flips:
        data[int(where * len(data))] = value
    data = data[: max(1, int(cut * len(data)))]
    # With an IEND put back, a cut file passes the structure check and reaches the decoders.
    answers(bytes(data) + (IEND if end else b""), *target)


@FUZZ
@given(seed=st.sampled_from(SEEDS), junk=st.binary(min_size=1, max_size=64),
       where=st.floats(0, 1), target=st.sampled_from(TARGETS[:2]))  # fmt: skip
def test_fuzz_pngs_with_inserted_bytes(seed: bytes, junk: bytes, where: float, target) -> None:
    at = int(where * len(seed))
    answers(seed[:at] + junk + seed[at:], *target)


@FUZZ
@given(seed=st.sampled_from(SEEDS), at=st.integers(0, 40), value=st.integers(0, 255))
def test_fuzz_png_headers(seed: bytes, at: int, value: int) -> None:
    """A changed IHDR or first chunk, its CRC made right: the decoders see what it says."""
    data = bytearray(seed)
    data[8 + at] = value
    length = struct.unpack(">I", data[8:12])[0]
    if length == 13:
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    answers(bytes(data), (28, 28), "L")
