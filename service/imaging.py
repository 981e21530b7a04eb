"""Image bytes -> validated RGB picture -> the bundle's input tensor.

Training decodes its data through the same two functions (`decode`, `to_pixels`),
so a served image is prepared exactly as the images the model learnt from.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.manifest import Preprocessing

SUPPORTED_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "GIF": "image/gif", "TIFF": "image/tiff"}
SUPPORTED_MEDIA_TYPES = frozenset(SUPPORTED_FORMATS.values())


class ImageError(ValueError):
    """The bytes are not an image we can classify; `code` says why, for the API."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def decode(data: bytes, *, max_pixels: int = 40_000_000) -> Image.Image:
    """Decode and fully load an image, rejecting empty, unknown, truncated and oversized ones."""
    if not data:
        raise ImageError("empty_body", "the request carries no image bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.format not in SUPPORTED_FORMATS:
                raise ImageError(
                    "unsupported_image_format",
                    f"image format {image.format} is not supported; send one of {', '.join(sorted(SUPPORTED_FORMATS))}",
                )
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError("image_too_large", f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            image.load()  # decodes now, so truncation is caught here rather than later
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError("not_an_image", "the bytes are not an image in a format this server can read") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError("image_too_large", str(exc)) from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError("corrupt_image", f"the image could not be decoded: {exc}") from None
    if width < 1 or height < 1:
        raise ImageError("corrupt_image", "the image has no pixels")
    return image


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 array (size, size, 3), resized bilinearly where the image is another size."""
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode in ("P", "LA", "PA") else image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def to_input(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32, scaled and normalised as the manifest says."""
    x = pixels.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
