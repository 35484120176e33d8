"""The bad-input battery: every request a hostile or careless client may send, with the status and
error type the service answers (README, Reliability). Used by test_reliability_inputs.py.

Each case is a set of httpx request arguments; the server under test runs with LIMITS.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

MiB = 1024 * 1024
LIMITS = {
    "max_body_bytes": 2 * MiB,
    "max_image_bytes": 1 * MiB,
    "max_image_pixels": 4096 * 4096,
    "max_images_per_request": 4,
    "max_prompt_chars": 20_000,
    "max_new_tokens": 4096,
}
CHAT = "/v1/chat/completions"


@dataclass
class Case:
    name: str
    status: int
    error_type: str | None  # None for 200
    request: dict[str, Any] = field(default_factory=dict)  # httpx.request keyword arguments
    path: str = "/generate"
    method: str = "POST"


def encode(image: Image.Image, fmt: str = "PNG", **save: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(raw)}"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_from_rows(width: int, height: int, idat: bytes, color_type: int = 0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def decompression_bomb(side: int = 6000) -> bytes:
    """A valid greyscale PNG of side x side black pixels: ~36 Mpx (36 MB decoded) in ~35 kB."""
    row = b"\x00" * (side + 1)  # filter byte + pixels
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return png_from_rows(side, side, idat)


def noise(size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def exif_rotated_jpeg() -> bytes:
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    return encode(image, "JPEG", exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (24, 24), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    return encode(image, transparency=0)


def png_of(image: Image.Image) -> str:
    return data_url(encode(image))


def gen(image: str | None = None, prompt: str = "What is in the image?", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_new_tokens": 4, "stream": False, **fields}
    if image is not None:
        body["image"] = image
    return {"json": body}


def raw(body: bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


def chat(content: Any, **fields: Any) -> dict[str, Any]:
    return {"json": {"messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}}


def multipart(parts: bytes, boundary: str = "XBOUNDARY") -> dict[str, Any]:
    return raw(parts, f"multipart/form-data; boundary={boundary}")


def cases() -> list[Case]:
    png = encode(noise())
    jpeg = encode(noise(), "JPEG")
    max_chars, max_body = LIMITS["max_prompt_chars"], LIMITS["max_body_bytes"]
    truncated_part = b'--XBOUNDARY\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi'
    too_many = [{"type": "image_url", "image_url": {"url": data_url(png)}}] * (
        LIMITS["max_images_per_request"] + 1
    )
    return [
        # ---- images ---------------------------------------------------------------------------
        Case("non-image bytes (base64 text)", 400, "invalid_image", gen(b64(b"hello, not an image"))),
        Case("truncated PNG", 400, "invalid_image", gen(data_url(png[: len(png) // 2]))),
        Case("truncated JPEG", 400, "invalid_image", gen(data_url(jpeg[: len(jpeg) // 2], "image/jpeg"))),
        Case("invalid base64", 400, "invalid_image", gen("data:image/png;base64,!!!not*base64")),
        Case("data: URL, non-image MIME", 400, "invalid_image", gen(data_url(png, "text/html"))),
        Case("data: URL, image MIME != content", 200, None, gen(data_url(png, "image/jpeg"))),
        Case("http:// URL", 400, "invalid_image", gen("http://169.254.169.254/latest/meta-data")),
        Case("https:// URL", 400, "invalid_image", gen("https://example.com/cat.png")),
        Case("file:// URL", 400, "invalid_image", gen("file:///etc/passwd")),
        Case("decompression bomb (36 Mpx, 35 kB PNG)", 400, "invalid_image", gen(data_url(decompression_bomb()))),
        Case("header claims 100000x100000", 400, "invalid_image", gen(data_url(png_from_rows(100_000, 100_000, b"")))),
        Case("0-pixel PNG (0x16)", 400, "invalid_image", gen(data_url(png_from_rows(0, 16, zlib.compress(b""))))),
        Case("1x1 image", 200, None, gen(data_url(encode(Image.new("RGB", (1, 1), (9, 9, 9)))))),
        Case("4096x4096 (at the pixel limit)", 200, None, gen(data_url(encode(Image.new("L", (4096, 4096), 90))))),
        Case("4097x4096 (over the pixel limit)", 400, "invalid_image", gen(png_of(Image.new("1", (4097, 4096))))),
        Case("1x4000 (aspect ratio 4000:1)", 400, "invalid_image", gen(data_url(encode(Image.new("RGB", (1, 4000)))))),
        Case("image over max_image_bytes", 400, "invalid_image", gen(b64(b"\x00" * (LIMITS["max_image_bytes"] + 10)))),
        Case("CMYK JPEG", 200, None, gen(data_url(encode(Image.new("CMYK", (30, 20), (0, 200, 200, 0)), "JPEG")))),
        Case("RGBA PNG", 200, None, gen(data_url(encode(Image.new("RGBA", (30, 20), (0, 0, 255, 100)))))),
        Case("palette PNG with transparency", 200, None, gen(data_url(palette_with_transparency()))),
        Case("16-bit greyscale PNG", 200, None, gen(png_of(Image.fromarray(np.full((20, 30), 40000, np.uint16))))),
        Case("8-bit greyscale PNG", 200, None, gen(data_url(encode(Image.new("L", (30, 20), 77))))),
        Case("animated GIF (first frame used)", 200, None, gen(data_url(animated_gif(), "image/gif"))),
        Case("EXIF-rotated JPEG", 200, None, gen(data_url(exif_rotated_jpeg(), "image/jpeg"))),
        Case("multipart: two image files", 400, "invalid_request", {
            "data": {"prompt": "x"},
            "files": [("image", ("a.png", png, "image/png")), ("image", ("b.png", png, "image/png"))],
        }),
        Case("too many images (OpenAI route)", 422, "invalid_request", chat(too_many), CHAT),
        Case("image URL (OpenAI route)", 400, "invalid_image", chat(
            [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, {"type": "text", "text": "hi"}]
        ), CHAT),
        # ---- prompts --------------------------------------------------------------------------
        Case("empty prompt", 422, "invalid_request", gen(prompt="")),
        Case("whitespace-only prompt", 422, "invalid_request", gen(prompt=" \n\t ")),
        Case("prompt longer than the model context", 400, "context_length_exceeded", gen(prompt="tok " * 4500)),
        Case("prompt over max_prompt_chars", 422, "invalid_request", gen(prompt="x" * (max_chars + 1))),
        Case("lone surrogate in the prompt (JSON \\ud800)", 422, "invalid_request", raw(b'{"prompt": "a\\ud800b"}')),
        Case("lone surrogate in a stop string", 422, "invalid_request", raw(b'{"prompt": "a", "stop": ["\\udc00"]}')),
        Case("lone surrogate (OpenAI route)", 422, "invalid_request",
             raw(b'{"messages": [{"role": "user", "content": "a\\ud800"}]}'), CHAT),
        Case("invalid UTF-8 in a JSON body", 422, "invalid_request", raw(b'{"prompt": "a\xff\xfe"}')),
        Case("invalid UTF-8 (OpenAI route)", 422, "invalid_request",
             raw(b'{"messages": [{"role": "user", "content": "a\xff"}]}'), CHAT),
        # ---- fields ---------------------------------------------------------------------------
        Case("max_new_tokens = 0", 422, "invalid_request", gen(max_new_tokens=0)),
        Case("max_new_tokens = -5", 422, "invalid_request", gen(max_new_tokens=-5)),
        Case("max_new_tokens over the limit", 422, "invalid_request", gen(max_new_tokens=LIMITS["max_new_tokens"] + 1)),
        Case("max_tokens = 0 (OpenAI route)", 422, "invalid_request", chat("hi", max_tokens=0), CHAT),
        Case("prompt is a number", 422, "invalid_request", {"json": {"prompt": 123}}),
        Case("image is a number", 422, "invalid_request", gen(image=5)),  # type: ignore[arg-type]
        Case("image is a list", 422, "invalid_request", gen(image=[b64(png), b64(png)])),  # type: ignore[arg-type]
        Case("max_new_tokens is a string", 422, "invalid_request", gen(max_new_tokens="ten")),
        Case("stop holds a number", 422, "invalid_request", gen(stop=[1])),
        Case("temperature NaN", 422, "invalid_request", raw(b'{"prompt": "a", "temperature": NaN}')),
        Case("top_p Infinity", 422, "invalid_request", raw(b'{"prompt": "a", "top_p": Infinity}')),
        Case("seed > 2^63-1", 422, "invalid_request", gen(seed=2**64)),
        Case("kv_budget = 1 (below the floor)", 422, "invalid_request", gen(acceleration={"kv_budget": 1})),
        Case("temperature 1e-300 (taken as greedy)", 200, None, gen(temperature=1e-300)),
        Case("top_p 5e-324 (keeps the top token)", 200, None, gen(temperature=1.0, top_p=5e-324, seed=7)),
        Case("unknown field", 422, "invalid_request", gen(bogus=True)),
        Case("messages empty (OpenAI route)", 422, "invalid_request", {"json": {"messages": []}}, CHAT),
        # ---- bodies ---------------------------------------------------------------------------
        Case("invalid JSON", 422, "invalid_request", raw(b'{"prompt": "a",')),
        Case("JSON that is not an object", 422, "invalid_request", raw(b'["prompt", "a"]')),
        Case("empty body", 422, "invalid_request", raw(b"")),
        Case("wrong content type (text/plain)", 415, "unsupported_media_type", raw(b"prompt=hi", "text/plain")),
        Case("multipart without a boundary", 400, "invalid_request", raw(b"--x--", "multipart/form-data")),
        Case("multipart, truncated", 422, "invalid_request", multipart(truncated_part)),
        Case("body over max_body_bytes", 413, "body_too_large", raw(b"{" + b" " * (max_body + 1) + b"}")),
        Case("GET on a POST route", 405, "method_not_allowed", {}, "/generate", "GET"),
        Case("unknown route", 404, "not_found", gen(), "/nope"),
    ]  # fmt: skip
