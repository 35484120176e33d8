"""Image intake: base64 / data: URL / upload bytes -> a bounded, upright RGB PIL image.

Limits are checked before the pixels are decoded: the byte size first, then the header's
width x height and aspect ratio (PIL reads only the header on `Image.open`). Remote URLs are
refused: the service never fetches anything on a client's behalf.
"""

from __future__ import annotations

import base64
import binascii
import io

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


def decode_image_bytes(
    data: bytes, *, max_pixels: int, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
) -> Image.Image:
    """Bytes of an image file -> RGB image, upright per EXIF, first frame if animated."""
    if not data:
        raise ImageError("image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} pixels; at most {max_pixels} pixels are accepted")
        if max(width, height) > max_aspect_ratio * min(width, height):
            raise ImageError(
                f"image is {width}x{height} pixels; its aspect ratio may be at most {max_aspect_ratio:g}:1"
            )
        image.seek(0)  # animated images: the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image is too large (more than {max_pixels} pixels)") from None
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
