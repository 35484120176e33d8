"""Image intake: limits before decoding, EXIF orientation, every mode to RGB, first GIF frame."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from app.images import decode_image_bytes, decode_image_string, image_string_to_bytes
from lightvlm_core.errors import ImageError

MAX_PIXELS = 4096 * 4096


def encode(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data: a decompression-bomb probe."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_rgb_png_round_trip() -> None:
    image = decode_image_bytes(encode(Image.new("RGB", (5, 3), (1, 2, 3))), max_pixels=MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (5000, 4000), (65_000, 300)])
def test_pixel_cap_checked_from_header_before_decoding(width: int, height: int) -> None:
    with pytest.raises(ImageError, match="pixels"):
        decode_image_bytes(png_header_only(width, height), max_pixels=MAX_PIXELS)


def test_byte_cap_checked_before_base64_decoding() -> None:
    raw = encode(Image.new("RGB", (64, 64)), "BMP")
    with pytest.raises(ImageError, match="larger than"):
        image_string_to_bytes(base64.b64encode(raw).decode(), max_bytes=1000)
    assert image_string_to_bytes(base64.b64encode(raw).decode(), max_bytes=len(raw)) == raw


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image_bytes(encode(image, "JPEG", exif=exif.tobytes()), max_pixels=MAX_PIXELS)
    assert decoded.size == (20, 40)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (8, 8), 128),
        Image.new("1", (8, 8), 1),
        Image.new("P", (8, 8), 3),
        Image.new("CMYK", (8, 8), (0, 255, 255, 0)),
        Image.new("LA", (8, 8), (10, 255)),
        Image.new("RGBA", (8, 8), (0, 0, 255, 255)),
    ],
    ids=lambda im: im.mode,
)
def test_modes_become_rgb(image: Image.Image) -> None:
    fmt = "TIFF" if image.mode == "CMYK" else "PNG"
    decoded = decode_image_bytes(encode(image, fmt), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB" and decoded.size == (8, 8)


def test_transparency_becomes_white() -> None:
    decoded = decode_image_bytes(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0))), max_pixels=MAX_PIXELS)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)
    half = decode_image_bytes(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 128))), max_pixels=MAX_PIXELS)
    assert 120 <= half.getpixel((0, 0))[0] <= 135


def test_palette_with_transparency() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    decoded = decode_image_bytes(encode(image, transparency=0), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    pixels = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    decoded = decode_image_bytes(encode(Image.fromarray(pixels)), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB" and 125 <= decoded.getpixel((0, 0))[0] <= 130


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    raw = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = decode_image_bytes(raw, max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB" and decoded.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_common_formats(fmt: str) -> None:
    decoded = decode_image_bytes(encode(Image.new("RGB", (16, 16), (0, 128, 0)), fmt), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB" and decoded.size == (16, 16)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"GIF89a",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 30,
        b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        b"\xff\xd8\xff" + b"\x00" * 100,
    ],
)
def test_garbage_is_an_image_error(raw: bytes) -> None:
    with pytest.raises(ImageError):
        decode_image_bytes(raw, max_pixels=MAX_PIXELS)


def test_truncated_jpeg_is_an_image_error() -> None:
    raw = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageError):
        decode_image_bytes(raw[: len(raw) // 2], max_pixels=MAX_PIXELS)


def test_data_url_and_plain_base64() -> None:
    raw = encode(Image.new("RGB", (2, 2)))
    b64 = base64.b64encode(raw).decode()
    for value in (
        b64,
        f"data:image/png;base64,{b64}",
        f"DATA:image/png;BASE64,{b64}",
        b64[:10] + "\n" + b64[10:],
    ):
        assert decode_image_string(value, max_bytes=10_000, max_pixels=MAX_PIXELS).size == (2, 2)


@pytest.mark.parametrize(
    "value,match",
    [
        ("https://example.com/x.png", "not fetched"),
        ("HTTP://example.com/x.png", "not fetched"),
        ("ftp://example.com/x.png", "scheme"),
        ("data:image/png,rawbytes", "base64"),
        ("data:application/pdf;base64,AAAA", "media type"),
    ],
)
def test_refused_image_strings(value: str, match: str) -> None:
    with pytest.raises(ImageError, match=match):
        decode_image_string(value, max_bytes=10_000, max_pixels=MAX_PIXELS)


def test_dark_16_bit_image_stays_dark() -> None:
    pixels = np.full((4, 4), 200, dtype=np.uint16)  # nearly black in 16 bits
    decoded = decode_image_bytes(encode(Image.fromarray(pixels)), max_pixels=MAX_PIXELS)
    assert decoded.getpixel((0, 0))[0] <= 1


def test_float_image_in_unit_range() -> None:
    pixels = np.full((4, 4), 0.5, dtype=np.float32)
    decoded = decode_image_bytes(encode(Image.fromarray(pixels), "TIFF"), max_pixels=MAX_PIXELS)
    assert decoded.mode == "RGB" and 126 <= decoded.getpixel((0, 0))[0] <= 128
