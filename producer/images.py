"""Reading and checking inputs on the producer side: paths, bytes, PIL images, arrays.

A producer refuses what it can't send before anything is enqueued. The worker checks again
(see ``worker.preprocess``): a message can bypass the producer.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import pyspng
from PIL import Image

from producer.errors import ImageTooLargeError, InvalidImageError, UnsupportedFormatError

#: Formats accepted end to end. Pillow reads many more; each one is attack surface.
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP"})

#: File name extensions a directory walk picks up.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})

ImageInput: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray
)


def describe(image: Any) -> str:
    """A short name for an input, for error messages (never its bytes)."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"<{len(image)} bytes>"
    if isinstance(image, np.ndarray):
        return f"<array {image.shape} {image.dtype}>"
    if isinstance(image, Image.Image):
        return f"<PIL image {image.size[0]}x{image.size[1]} {image.mode}>"
    return f"<{type(image).__name__}>"


def image_bytes(image: ImageInput, max_bytes: int, max_pixels: int) -> bytes:
    """The encoded image bytes to send for ``image``, checked; :class:`InvalidImageError` if not.

    Paths and bytes are sent as they are (the worker decodes them); PIL images and arrays are
    encoded losslessly as PNG.
    """
    name = describe(image)
    if isinstance(image, (str, os.PathLike)):
        data = read_file(image, max_bytes)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
    elif isinstance(image, Image.Image):
        data = _png(image)
    elif isinstance(image, np.ndarray):
        data = _png(Image.fromarray(_as_uint8_image(image)))
    else:
        raise InvalidImageError(f"{name}: expected a path, bytes, a PIL image or a numpy array")
    check_image_bytes(data, name, max_bytes, max_pixels)
    return data


def sniff_format(data: bytes) -> str | None:
    """The allowed format ``data`` starts like (PNG, JPEG, WEBP, BMP), from its magic bytes.

    Microseconds, where opening with Pillow costs a hundred: the bulk path checks every file.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    return None


def image_header(data: bytes) -> tuple[str, int, int] | None:
    """An accepted image's format, width and height from its header; None if unreadable."""
    fmt = sniff_format(data)
    if fmt is None:
        return None
    try:
        width, height = _STRUCTURE[fmt](data)
    except (_Truncated, struct.error, IndexError, ValueError):
        return None
    return fmt, width, height


def check_image_bytes(data: bytes, name: str, max_bytes: int, max_pixels: int) -> str:
    """Check size, format, dimensions and completeness from the bytes' structure alone.

    No pixel is decoded: the format's header gives width and height, its end marker (or
    declared length) tells a truncated file. Returns the format name;
    :class:`InvalidImageError` names the input and the limit it broke.
    """
    if not data:
        raise InvalidImageError(f"{name}: empty input")
    if len(data) > max_bytes:
        raise ImageTooLargeError(
            f"{name}: {len(data)} bytes is over the limit of {max_bytes} bytes "
            "(BATCHERY_MAX_IMAGE_BYTES)"
        )
    fmt = sniff_format(data)
    if fmt is None:
        raise _other_format(data, name)
    try:
        width, height = _STRUCTURE[fmt](data)
    except _Truncated as exc:
        raise InvalidImageError(f"{name}: truncated {fmt} file ({exc})") from exc
    except (struct.error, IndexError, ValueError) as exc:
        raise InvalidImageError(f"{name}: not a readable {fmt} file ({exc})") from exc
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: {fmt} header says {width}x{height} pixels")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"{name}: {width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} pixels (BATCHERY_MAX_IMAGE_PIXELS)"
        )
    return fmt


#: Magic bytes of formats outside the allow-list, to name them in the refusal. Read from
#: the bytes alone: opening them with Pillow would parse a format we do not accept (and a
#: GIF whose header claims 20000x20000 would raise Pillow's bomb error).
_OTHER_FORMATS = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"), (b"%PDF", "PDF"), (b"8BPS", "PSD"), (b"qoif", "QOI"),
    (b"\xffO\xffQ", "JPEG 2000"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"DDS ", "DDS"),
    (b"icns", "ICNS"), (b"<svg", "SVG"), (b"<?xml", "SVG or XML"),
)  # fmt: skip


def _other_format(data: bytes, name: str) -> InvalidImageError:
    """The error for bytes of no accepted format, naming the format when its magic is known."""
    allowed = ", ".join(sorted(ALLOWED_FORMATS))
    other = next((fmt for magic, fmt in _OTHER_FORMATS if data.startswith(magic)), None)
    if other is None and data[4:8] == b"ftyp":
        other = "HEIF/AVIF"
    if other is None:
        return InvalidImageError(f"{name}: not a readable image (accepted: {allowed})")
    return UnsupportedFormatError(f"{name}: format {other} is not accepted (allowed: {allowed})")


class _Truncated(ValueError):
    """The file stops before its format says it ends."""


def _png_structure(data: bytes) -> tuple[int, int]:
    if data[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    # Every PNG ends with an empty IEND chunk, whose type and fixed CRC are these 8 bytes.
    if data.rfind(b"IEND\xaeB`\x82", 33) < 0:
        raise _Truncated("no IEND chunk at the end")
    return width, height


#: JPEG start-of-frame markers (C0-CF, less DHT C4, JPG C8 and DAC CC), which carry the size.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_structure(data: bytes) -> tuple[int, int]:
    size: tuple[int, int] | None = None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError(f"no marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            if size is None:
                raise ValueError("no frame header before the scan")
            # Inside the scan an FF byte is always followed by 00 or a restart marker, so the
            # first FF D9 after it is the end-of-image marker: a file without it is cut short.
            # Looked for from the end (rfind): whether there is one is the same answer, and
            # in a whole file it is the last two bytes, not 3 MB of scan away (2.3 ms).
            if data.rfind(b"\xff\xd9", i + 2 + length) < 0:
                raise _Truncated("no end-of-image marker")
            return size
        i += 2 + length
    raise _Truncated("no image data")


def _webp_structure(data: bytes) -> tuple[int, int]:
    declared = struct.unpack("<I", data[4:8])[0] + 8
    if declared > len(data):
        raise _Truncated(f"{declared} bytes declared, {len(data)} present")
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = struct.unpack("<I", data[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    raise ValueError(f"unknown WEBP chunk {chunk!r}")


def _bmp_structure(data: bytes) -> tuple[int, int]:
    offset = struct.unpack("<I", data[10:14])[0]
    header = struct.unpack("<I", data[14:18])[0]
    if header == 12:  # OS/2 core header
        width, height = struct.unpack("<HH", data[18:22])
        bpp, compression = struct.unpack("<H", data[24:26])[0], 0
    else:
        width, height = struct.unpack("<ii", data[18:26])
        bpp, compression = struct.unpack("<HI", data[28:34])
    height = abs(height)
    if compression == 0:  # uncompressed: the pixel rows' size is known
        needed = offset + (width * bpp + 31) // 32 * 4 * height
        if needed > len(data):
            raise _Truncated(f"{needed} bytes of pixels expected, {len(data)} present")
    return width, height


_STRUCTURE = {
    "PNG": _png_structure,
    "JPEG": _jpeg_structure,
    "WEBP": _webp_structure,
    "BMP": _bmp_structure,
}


_FORMATS = sorted(ALLOWED_FORMATS)
#: Modes Pillow resizes with any filter; others are converted (to RGB or RGBA) first. RGBX:
#: an RGB PNG decoded by libspng, shared with Pillow without a copy (4 bytes a pixel, alpha
#: unused: Pillow's own layout for RGB).
_RESIZABLE = frozenset({"L", "LA", "RGB", "RGBA", "RGBX", "I", "F"})


def decode_to_size(
    data: bytes, size: tuple[int, int], mode: str, max_bytes: int, max_pixels: int
) -> Image.Image:
    """``data`` decoded and brought to ``size`` (width, height) in ``mode``: what a model of
    that input sees; :class:`InvalidImageError` if it is not an image within the limits.

    Size, format, pixel count and completeness are checked from the file's structure before
    any pixel is decoded: a hostile input costs at most ``max_bytes`` in and ``max_pixels``
    decoded. A PNG is decoded by libspng (``pyspng``: a quarter of Pillow's time on a 28x28
    digit, whose cost is mostly per file), from the very IHDR the checks read; a PNG
    libspng refuses, and every other format, by Pillow, which checks the pixel count once
    more on its own reading of the header. Both decoders give the same pixels (the tests
    compare every PNG colour type and bit depth): 16-bit samples keep their high byte
    (``v >> 8``), and a tRNS colour key on a grey or RGB PNG makes its pixels transparent.
    Only what the model needs is decoded: a JPEG at the smallest DCT scale still at least
    ``size`` (Pillow's ``draft``: a 4000x3000 photo for a 224x224 model decodes at 500x375,
    a 64th of the pixels), other formats reduced by whole factors (``reduce``) before the
    final resize. The image is brought to ``size`` in its own mode before any conversion,
    so decoding peaks near its decoded size (up to 4 bytes a pixel, for RGB and RGBA; a
    16-bit PNG a few times more, decoded at 16 bits) instead of several copies of it.
    Transparent pixels become black. The worker runs this on every job; ``classify
    --shrink`` runs the same on the producer, so a shrunk image gives the worker the very
    same pixels. A decoder's error is ``cannot decode image: <Pillow's reason>``, whichever
    decoder met it first.
    """
    fmt = check_image_bytes(data, "image", max_bytes, max_pixels)
    if fmt == "PNG":
        try:
            return _decode_png_spng(data, size, mode)
        except _SpngRefused:
            pass  # Pillow decides: it decodes the file, or says why not
    return _decode_pillow(data, size, mode, max_pixels)


def _decode_pillow(data: bytes, size: tuple[int, int], mode: str, max_pixels: int
                   ) -> Image.Image:  # fmt: skip
    """:func:`decode_to_size`'s decoding by Pillow, once the bytes are checked."""
    try:
        with Image.open(io.BytesIO(data), formats=_FORMATS) as img:
            pixels = img.size[0] * img.size[1]
            if pixels > max_pixels:
                raise InvalidImageError(
                    f"image is {img.size[0]}x{img.size[1]} = {pixels} pixels, "
                    f"over the limit of {max_pixels}"
                )
            if img.size != size:
                img.draft(mode, size)  # JPEG: the decoder itself scales down
            img.load()
            decoded = _pillow_png(img, data) if img.format == "PNG" else img
            converted = _fit(decoded, size, mode)
            # Closing the file closes the image opened from it: hand back one of its own.
            return converted.copy() if converted is img else converted
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"image refused by Pillow's pixel limit: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise InvalidImageError(
            f"cannot decode image: not one of {', '.join(sorted(ALLOWED_FORMATS))}"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise InvalidImageError(f"cannot decode image: {exc}") from exc


def _fit(img: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """A decoded image brought to ``size`` in ``mode``: both decoders' last steps."""
    small = img
    if img.size != size:
        if img.mode not in _RESIZABLE:
            small = small.convert("RGBA" if _transparent(img) else "RGB")
        # reducing_gap: whole-factor box reduction first (Pillow's reduce), then the filter
        # on what is left. RGBA and LA are resized premultiplied: composing over black
        # afterwards gives what composing first would, on far fewer pixels.
        small = small.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return _to_mode(small, mode)


class _SpngRefused(Exception):
    """libspng cannot decode this PNG (or its chunks do not add up): Pillow decides."""


class _PngChunks(NamedTuple):
    """What the PNG's chunks before its first IDAT say about its pixels."""

    bit_depth: int
    colour_type: int  # 0 grey, 2 RGB, 3 palette, 4 grey and alpha, 6 RGBA
    palette: tuple[int, int] | None  # where the PLTE chunk starts and ends in the file
    trns: bytes | None  # the tRNS chunk's contents


def _png_chunks(data: bytes, whole: bool = True) -> _PngChunks:
    """IHDR, PLTE and tRNS of a PNG, read from its chunks before the first IDAT;
    :class:`ValueError` if they do not add up.

    ``whole``: every chunk up to IEND is read, its CRC checked, and a repeated or misplaced
    one refused. libspng, as pyspng calls it, checks neither CRCs nor zlib's checksum, where
    Pillow, with zlib, refuses a corrupted file: the CRCs (a millisecond for 10 MB) make the
    libspng path refuse what Pillow would. Otherwise the chunks are read as far as the first
    IDAT, and as Pillow has read them already, unchecked.
    """
    ihdr = palette = trns = None
    idat = False
    view = memoryview(data)
    at = 8
    while True:
        length, kind = struct.unpack_from(">I4s", data, at)
        end = at + 12 + length
        if end > len(data):
            raise ValueError(f"{kind!r} chunk runs past the end of the file")
        if not whole and kind == b"IDAT":
            idat = True
            break
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if whole and zlib.crc32(view[at + 4 : end - 4]) != crc:
            raise ValueError(f"bad CRC in the {kind!r} chunk")
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            idat = True
        elif kind == b"IHDR" and ihdr is None and at == 8 and length == 13:
            ihdr = data[at + 8 : end - 4]
        elif kind == b"PLTE" and palette is None and not idat:
            palette = (at, end)
        elif kind == b"tRNS" and trns is None and not idat:
            trns = data[at + 8 : end - 4]
        elif whole and kind in (b"IHDR", b"PLTE", b"tRNS"):
            raise ValueError(f"misplaced or repeated {kind!r} chunk")
        at = end
    if not idat:
        raise ValueError("no IDAT chunk")
    if ihdr is None:
        raise ValueError("no IHDR chunk")
    if ihdr[8] not in _PNG_DEPTHS.get(ihdr[9], ()):
        raise ValueError(f"bit depth {ihdr[8]} with colour type {ihdr[9]}")
    return _PngChunks(ihdr[8], ihdr[9], palette, trns)


#: The bit depths the PNG spec allows for each colour type.
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _trns_key(png: _PngChunks) -> tuple[int, ...] | None:
    """The tRNS colour key of a grey or RGB PNG, in sample values (each masked to the bit
    depth, as the PNG spec says); None if it has none. ValueError if the chunk is short."""
    if png.trns is None or png.colour_type not in (0, 2):
        return None
    channels = 1 if png.colour_type == 0 else 3
    if len(png.trns) < 2 * channels:
        raise ValueError("truncated tRNS chunk")
    mask = (1 << png.bit_depth) - 1
    return tuple(v & mask for v in struct.unpack(f">{channels}H", png.trns[: 2 * channels]))


def _keyed(pixels: np.ndarray, samples: np.ndarray, key: tuple[int, ...] | None
           ) -> Image.Image:  # fmt: skip
    """Grey (HxW) or RGB (HxWx3) 8-bit ``pixels`` as an image, with an alpha channel that is
    0 where ``samples`` (the same pixels as the PNG stores them) equal the tRNS ``key``."""
    if key is None:
        return _shared(pixels, "L") if pixels.ndim == 2 else Image.fromarray(pixels)
    if samples.ndim == 2:
        opaque = samples != key[0]
    else:
        opaque = (samples != np.array(key, samples.dtype)).any(axis=2)
    return Image.fromarray(np.dstack([pixels, opaque.astype(np.uint8) * np.uint8(255)]))


def _grey_key(png: _PngChunks) -> tuple[int, ...] | None:
    """A grey PNG's key as a value of its 8-bit pixels (1, 2 and 4 bits are scaled up)."""
    key = _trns_key(png)
    if key is None or png.bit_depth >= 8:
        return key
    return (key[0] * (255 // ((1 << png.bit_depth) - 1)),)


def _decode_png_spng(data: bytes, size: tuple[int, int], mode: str) -> Image.Image:
    """:func:`decode_to_size`'s decoding of a checked PNG by libspng; :class:`_SpngRefused`
    for what libspng refuses."""
    try:
        png = _png_chunks(data)
        key = _grey_key(png) if png.colour_type == 0 else _trns_key(png)
        if png.colour_type == 0 and png.bit_depth == 16:
            grey = _spng16(data)[:, :, 0]  # libspng's only 16-bit grey output: grey, alpha
            img = _keyed((grey >> 8).astype(np.uint8), grey, key)
        elif png.colour_type == 0:
            grey = _spng(data, "L")
            img = _keyed(grey, grey, key)
        elif png.colour_type == 3:
            img = _spng_palette(data, png)
        elif png.colour_type == 2 and key is not None and png.bit_depth == 16:
            rgb = _spng16(data)[:, :, :3]  # RGBA at 16 bits: the key is a 16-bit colour
            img = _keyed((rgb >> 8).astype(np.uint8), rgb, key)
        else:
            rgba = _spng(data, "RGBA")  # 16 bits: the high byte, as Pillow reads them
            if png.colour_type != 2:  # grey and alpha (RGBA with R = G = B), RGBA
                img = _shared(rgba, "RGBA")
            elif key is not None:
                img = _keyed(rgba[:, :, :3], rgba[:, :, :3], key)
            else:  # RGB in Pillow's own layout (4 bytes a pixel): no copy
                img = _shared(rgba, "RGBX")
        return _fit(img, size, mode)
    except (ValueError, OSError, struct.error) as exc:  # Pillow's on odd palettes, ours
        raise _SpngRefused(str(exc)) from exc


def _shared(pixels: np.ndarray, mode: str) -> Image.Image:
    """A uint8 array as an image sharing its memory (``L``: HxW; ``RGBA`` and ``RGBX``:
    HxWx4), without ``Image.fromarray``'s inspection (a tenth of a 28x28 PNG's
    decode_to_size)."""
    height, width = pixels.shape[:2]
    contiguous = np.ascontiguousarray(pixels)
    return Image.frombuffer(mode, (width, height), contiguous, "raw", mode, 0, 1)


def _spng(data: bytes, fmt: str) -> np.ndarray:
    """``pyspng.load`` to 8-bit ``fmt``, with whatever it raises made :class:`_SpngRefused`."""
    try:
        pixels = pyspng.load(data, fmt)
    except Exception as exc:  # a C++ runtime_error, MemoryError, ...: Pillow decides
        raise _SpngRefused(str(exc)) from exc
    if pixels.dtype != np.uint8 or pixels.ndim != (2 if fmt == "L" else 3):
        raise _SpngRefused(f"pyspng gave {pixels.dtype} {pixels.shape} for {fmt}")
    return pixels


def _spng16(data: bytes) -> np.ndarray:
    """A 16-bit grey or RGB PNG by ``pyspng.load`` in its own format: grey and alpha, or
    RGBA, at 16 bits (HxWxC); :class:`_SpngRefused` as :func:`_spng`."""
    try:
        pixels = pyspng.load(data)
    except Exception as exc:
        raise _SpngRefused(str(exc)) from exc
    if pixels.dtype != np.uint16 or pixels.ndim != 3:
        raise _SpngRefused(f"pyspng gave {pixels.dtype} {pixels.shape} for a 16-bit PNG")
    return pixels


def _spng_palette(data: bytes, png: _PngChunks) -> Image.Image:
    """A palette PNG as the ``P`` image Pillow reads: libspng decodes it with a palette of
    ``i -> (i, i, i)`` in place of its own, which gives each pixel's index (pyspng has no
    output of indices, nor of the palette's tRNS alphas). The checks libspng would make of
    the palette it no longer sees are made here."""
    if png.palette is None:
        raise _SpngRefused("no PLTE chunk")
    start, end = png.palette
    colours = data[start + 8 : end - 4]
    count = len(colours) // 3
    if len(colours) % 3 or not 0 < count <= 1 << png.bit_depth:
        raise _SpngRefused(f"a PLTE chunk of {len(colours)} bytes")
    if png.trns is not None and len(png.trns) > count:
        raise _SpngRefused("more tRNS entries than colours")
    entries = np.repeat(np.arange(1 << png.bit_depth, dtype=np.uint8), 3).tobytes()
    plte = b"PLTE" + entries
    chunk = struct.pack(">I", len(entries)) + plte + struct.pack(">I", zlib.crc32(plte))
    indices = _spng(data[:start] + chunk + data[end:], "RGB")[:, :, 0]
    img = Image.fromarray(np.ascontiguousarray(indices))
    img.putpalette(colours, "RGB")
    if png.trns is not None:
        img.info["transparency"] = png.trns  # an alpha per index, as Pillow keeps them
    return img


def _pillow_png(img: Image.Image, data: bytes) -> Image.Image:
    """A PNG as Pillow decoded it, made what libspng gives: 16-bit grey (Pillow's ``I;16``,
    which ``convert("L")`` would clip) scaled to 8 bits, and a tRNS colour key on a grey or
    RGB PNG (which Pillow's conversions ignore) made an alpha channel."""
    if img.mode not in ("I", "I;16") and (
        img.mode not in ("1", "L", "RGB") or "transparency" not in img.info
    ):
        return img  # Pillow notes a tRNS chunk in info; we read its key ourselves
    png = _png_chunks(data, whole=False)
    if img.mode in ("I", "I;16"):  # 16-bit grey (older Pillows read it as I)
        grey16 = np.asarray(img)
        return _keyed((grey16 >> 8).astype(np.uint8), grey16, _trns_key(png))
    if png.colour_type == 0:
        key = _grey_key(png)
        if key is None:
            return img
        grey = np.asarray(img.convert("L"))  # 1 bit: 0 and 255
        return _keyed(grey, grey, key)
    key = _trns_key(png)
    if key is None:
        return img
    rgb = np.asarray(img)
    if png.bit_depth != 16:
        return _keyed(rgb, rgb, key)
    # Pillow keeps the high byte of 16-bit RGB: the low one, for the key, by decoding again.
    with Image.open(io.BytesIO(data), formats=["PNG"]) as low:
        low.tile = [tile._replace(args="RGB;16L") for tile in low.tile]
        low.load()
        samples = (rgb.astype(np.uint16) << 8) | np.asarray(low)
    return _keyed(rgb, samples, key)


def shrink(data: bytes, size: tuple[int, int], mode: str, max_bytes: int, max_pixels: int
           ) -> bytes:  # fmt: skip
    """``data`` as the model will see it (:func:`decode_to_size`), encoded as a lossless PNG:
    a 4 MB photo for a 224x224 model travels as about 100 KB, and the worker, finding it
    already at the model's size, computes from the very same pixels."""
    out = io.BytesIO()
    decode_to_size(data, size, mode, max_bytes, max_pixels).save(
        out, format="PNG", compress_level=1
    )
    return out.getvalue()


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode``; transparent pixels become black, the MNIST background."""
    if img.mode == mode:
        return img
    if _transparent(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert(mode)


def _transparent(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def read_file(path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """A regular file's bytes, at most ``max_bytes`` of them; :class:`InvalidImageError` if not.

    Opened without blocking and checked before reading: a FIFO, a device (``x.png ->
    /dev/zero``) or a directory is refused, and no read goes past the byte limit.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise InvalidImageError(f"{path}: no such file") from exc
    except PermissionError as exc:
        raise InvalidImageError(f"{path}: permission denied") from exc
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot open ({exc.strerror})") from exc
    return _read_open(fd, path, max_bytes)


def read_shared(path: str, roots: Sequence[str | os.PathLike[str]], max_bytes: int) -> bytes:
    """The file at ``path``, read as :func:`read_file` reads, if it lies under one of
    ``roots`` (BATCHERY_SHARED_ROOTS) with no symbolic link on the way.

    Each part of the path below the root is opened relative to the one before it, never
    following a link (``O_NOFOLLOW``): a link out of the root, or a directory swapped for
    one while the path is walked, is refused rather than followed. :class:`InvalidImageError`
    says which.
    """
    if not roots:
        raise InvalidImageError(
            f"{path}: this worker reads no files: BATCHERY_SHARED_ROOTS is not set on it "
            "(send the image's bytes, or set it to the directories workers share)"
        )
    for root in roots:
        base = os.path.realpath(root)
        if not path.startswith(base.rstrip("/") + "/"):
            continue
        parts = path[len(base) :].strip("/").split("/")
        if "" in parts:
            raise InvalidImageError(f"{path}: not a plain path (empty parts)")
        directory = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                                dir_fd=directory)  # fmt: skip
                os.close(directory)
                directory = inner
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW,
                         dir_fd=directory)  # fmt: skip
        except FileNotFoundError as exc:
            raise InvalidImageError(f"{path}: no such file") from exc
        except PermissionError as exc:
            raise InvalidImageError(f"{path}: permission denied") from exc
        except OSError as exc:  # ELOOP, ENOTDIR: a link where a file or folder should be
            raise InvalidImageError(
                f"{path}: a symbolic link on the way is not followed ({exc.strerror})"
            ) from exc
        finally:
            os.close(directory)
        return _read_open(fd, path, max_bytes)
    shown = ", ".join(str(r) for r in roots)
    raise InvalidImageError(f"{path}: not under BATCHERY_SHARED_ROOTS ({shown})")


def _read_open(fd: int, path: str | os.PathLike[str], max_bytes: int) -> bytes:
    """Read an opened file: regular files only, at most ``max_bytes``; closes ``fd``."""
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InvalidImageError(f"{path}: is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise InvalidImageError(f"{path}: not a regular file (a device, a FIFO or a socket)")
        if info.st_size > max_bytes:
            raise ImageTooLargeError(
                f"{path}: {info.st_size} bytes is over the limit of {max_bytes} bytes "
                "(BATCHERY_MAX_IMAGE_BYTES)"
            )
    except BaseException:
        os.close(fd)
        raise
    # One read of what fstat said plus one byte, to see the end: not max_bytes + 1 through a
    # buffered file, which allocates max_bytes (10 MB) for every 300-byte digit.
    try:
        data = os.read(fd, info.st_size + 1)
        parts = [data]
        if len(data) != info.st_size:
            # Cut short (a file system that reads in parts, a file truncated meanwhile) or
            # grown since fstat: read on to its end, never past the limit.
            got = len(data)
            while got <= max_bytes:
                more = os.read(fd, max_bytes + 1 - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
    finally:
        os.close(fd)
    data = b"".join(parts)
    if len(data) > max_bytes:  # it grew while we read it
        raise ImageTooLargeError(
            f"{path}: over the limit of {max_bytes} bytes (BATCHERY_MAX_IMAGE_BYTES)"
        )
    return data


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _as_uint8_image(array: np.ndarray) -> np.ndarray:
    """An HxW, HxWx1, HxWx3 or HxWx4 array as uint8 pixels (floats must lie in [0, 1])."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImageError(
            f"<array {array.shape}>: expected HxW, HxWx1, HxWx3 or HxWx4 pixels"
        )
    if array.size == 0:
        raise InvalidImageError(f"<array {array.shape}>: empty array")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise InvalidImageError(
                f"<array {array.shape} {array.dtype}>: float pixels must lie in [0, 1]"
            )
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise InvalidImageError(
                f"<array {array.shape} {array.dtype}>: integer pixels must lie in [0, 255]"
            )
        return array.astype(np.uint8)
    raise InvalidImageError(f"<array {array.dtype}>: unsupported pixel type")
