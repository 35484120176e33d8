"""Image intake: base64 / data: URL / upload bytes -> a bounded, upright RGB PIL image.

Limits are checked before the pixels are decoded: the byte size first, then the header's
width x height and aspect ratio (PIL reads only the header on `Image.open`). Remote URLs are
refused: the service never fetches anything on a client's behalf.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections import deque
from dataclasses import dataclass

from PIL import (  # noqa: F401  (plugins register their formats; Image.open only tries registered ones)
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from app.errors import ServiceError
from lightvlm_core.errors import ImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG includes MPO (camera JPEGs)
DEFAULT_MAX_ASPECT_RATIO = 50.0
_BACKGROUND = (255, 255, 255)  # transparent pixels become white


def decode_image_string(
    value: str, *, max_bytes: int, max_pixels: int, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
) -> Image.Image:
    """Decode a base64 string or a `data:image/...;base64,` URL."""
    data = image_string_to_bytes(value, max_bytes=max_bytes)
    return decode_image_bytes(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)


def image_string_to_bytes(value: str, *, max_bytes: int) -> bytes:
    value = value.strip()
    lowered = value[:16].lower()
    if lowered.startswith(("http://", "https://")):
        raise ImageError("image URLs are not fetched by this server; send the image as base64 or a data: URL")
    if lowered.startswith("data:"):
        header, sep, value = value.partition(",")
        if not sep or not header.lower().endswith(";base64"):
            raise ImageError("a data: URL image must be base64-encoded (data:image/png;base64,...)")
        if not header[5:].lower().startswith("image/"):
            raise ImageError(f"unsupported data: URL media type {header[5:].split(';')[0]!r}")
    elif ":" in value[:16]:
        raise ImageError("unsupported image URL scheme; send base64 or a data: URL")
    value = "".join(value.split())  # base64 may be wrapped
    if len(value) * 3 // 4 > max_bytes + 3:
        raise ImageError(f"image is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageError(f"image is larger than {max_bytes} bytes")
    return data


@dataclass(frozen=True)
class ProbedImage:
    """An image file whose header passed the limits; its pixels are not decoded yet."""

    data: bytes
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def decode_image_bytes(
    data: bytes, *, max_pixels: int, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
) -> Image.Image:
    """Bytes of an image file -> RGB image, upright per EXIF, first frame if animated."""
    return load_image(probe_image(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio))


def probe_image(data: bytes, *, max_pixels: int, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> ProbedImage:
    """Read only the header and check size and aspect ratio (cheap: no pixel is decoded)."""
    if not data:
        raise ImageError("image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError:
        raise ImageError(f"image is too large (more than {max_pixels} pixels)") from None
    except Exception as exc:  # PIL raises many types for corrupt input: none may become a 500
        raise ImageError(f"could not decode the image: {type(exc).__name__}") from None
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
    if max(width, height) > max_aspect_ratio * min(width, height):
        raise ImageError(
            f"image is {width}x{height} pixels; its aspect ratio may be at most {max_aspect_ratio:g}:1"
        )
    return ProbedImage(data, width, height)


def load_image(probed: ProbedImage) -> Image.Image:
    """Decode a probed image's pixels -> RGB, upright per EXIF, first frame if animated."""
    try:
        image = Image.open(io.BytesIO(probed.data), formats=ALLOWED_FORMATS)
        image.seek(0)  # animated images: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Image.DecompressionBombError:
        raise ImageError(f"image is too large ({probed.width}x{probed.height} pixels)") from None
    except Exception as exc:  # PIL raises many types for corrupt input: none may become a 500
        raise ImageError(f"could not decode the image: {type(exc).__name__}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16-bit/float scaled to 8-bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        image = _high_depth_to_l(image)
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, ...


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit integer or float grey -> 8-bit grey (values scaled, not clipped)."""
    if image.mode == "F":
        high = image.getextrema()[1]
        scaled = image.point(lambda v: v * 255) if high <= 1.0 else image  # [0, 1] floats
        return scaled.convert("L")
    sixteen_bit = image.mode.startswith("I;16")
    image = image.convert("I")
    if sixteen_bit or image.getextrema()[1] > 255:  # 32-bit "I" holding 16-bit data, as PNG gives
        image = image.point(lambda v: v * (1 / 257))
    return image.convert("L")


class PixelBudget:
    """Bounds the decoded image pixels that all requests hold at once (a budget, not a per-image
    limit: a 98 KB PNG can decode to 4096x4096 RGBA, and ~40 decoding together exhaust memory).

    A request takes the pixels of all its images in one lease before decoding them (so two
    requests can never each hold half of what they need) and gives them back when it ends. Leases
    are granted first come, first served; one larger than the whole budget waits for it to be empty.
    """

    def __init__(self, capacity: int, max_waiting: int) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, pixels: int, timeout_s: float) -> PixelLease:
        """Wait (on the event loop, not in a thread) until `pixels` fit; a 429 when too many wait
        already, a 504 after `timeout_s`."""
        cost = min(pixels, self.capacity)
        if not self._waiting and self.in_use + cost <= self.capacity:
            self.in_use += cost
            return PixelLease(self, cost)
        if len(self._waiting) >= self.max_waiting:
            raise ServiceError(
                429, "queue_full", "too many requests are waiting to decode images", {"Retry-After": "1"}
            )
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, granted)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), timeout_s)
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self._give_back(cost)  # granted just as we gave up
            else:
                granted.cancel()
                self._waiting.remove(entry)
                self._grant()  # the queue's head may have changed
            if isinstance(exc, TimeoutError):
                raise ServiceError(504, "timeout", "timed out waiting to decode the image(s)") from None
            raise
        return PixelLease(self, cost)

    def _give_back(self, cost: int) -> None:
        self.in_use -= cost
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.in_use + self._waiting[0][0] <= self.capacity:
            cost, granted = self._waiting.popleft()
            self.in_use += cost
            granted.set_result(None)


class PixelLease:
    """Pixels held by one request; `release()` gives them back (idempotent)."""

    def __init__(self, budget: PixelBudget | None, pixels: int) -> None:
        self._budget, self.pixels = budget, pixels

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.pixels)


NO_PIXELS = PixelLease(None, 0)
