"""Image bytes -> validated RGB picture -> the bundle's input tensor.

Training decodes its data through the same two functions (`decode`, `to_pixels`),
so a served image is prepared exactly as the images the model learnt from.

Memory: sizes are checked from the header before any pixel is decoded, so one image costs
at most about

    PEAK_BYTES_PER_PIXEL x max_pixels = 16 B x 40 M = 640 MB at the defaults

(plus a few MB of fixed buffers) from `decode` through `to_pixels`. Pillow keeps a picture
in at most 4 bytes a pixel; the rest is what decoders and conversions hold beside it. The
worst is WebP, whose decoder keeps two 4 B canvases and hands Pillow a 4 B copy of the frame
(16). Next come a progressive JPEG, which keeps 2 B of DCT coefficients a sample for the
whole image (12 for CMYK), and `to_rgb`, which holds up to three pictures at once (LA ->
RGBA -> RGB, 12) or a float or int picture with its numpy copy (about 13). With
`target_size`, a baseline JPEG decodes at 1/2 to 1/8 scale and costs next to nothing.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

try:
    import simplejpeg
except ImportError:  # pragma: no cover - simplejpeg is in the serve extra; Pillow decodes everything without it
    simplejpeg = None

from service.manifest import Preprocessing

# MPO is the JPEG that phone cameras write with extra pictures appended; it is read as its
# first (main) picture, as animations (GIF, APNG, WebP) are read as their first frame.
SUPPORTED_FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                     "BMP": "image/bmp", "GIF": "image/gif", "TIFF": "image/tiff"}
SUPPORTED_MEDIA_TYPES = frozenset(SUPPORTED_FORMATS.values())

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_SIDE = 16_384
PEAK_BYTES_PER_PIXEL = 16  # see the module docstring; tests/test_imaging.py measures it

# EXIF Orientation (where the stored picture's first row and column belong) -> the transposition
# that shows it as a viewer does. 1 is upright; any other value means nothing and is ignored.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# The HTTP status that goes with each `ImageError.code`.
STATUS_BY_CODE = {
    "empty_body": 400,
    "not_an_image": 400,
    "corrupt_image": 400,
    "image_too_large": 413,
    "unsupported_image_format": 415,
}

# Transparent pixels are composited over white. CIFAR-like training images have no alpha, so
# any fixed background is a guess; white is what a browser shows behind a transparent picture.
BACKGROUND = (255, 255, 255)

# `decode` checks sizes itself, against the configured limits, before decoding; Pillow's own
# warning (at 89 M pixels) would only repeat that. A module-level filter, because
# warnings.catch_warnings is not thread-safe and decode runs in a thread pool.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Pillow warns about each odd tag of an EXIF block or TIFF directory ("Skipping tag 788"), and
# Python keeps every distinct warning it has shown for good: one crafted EXIF block of 64 k tags
# printed 130 k lines to the log, and an orientation tag of a new length each request ("had too
# many entries: 7") kept one more. The tags are skipped either way; nothing here is for a client.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")


class ImageError(ValueError):
    """The bytes are not an image we can classify; `code` says why, `status` is its HTTP status."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    @property
    def status(self) -> int:
        return STATUS_BY_CODE.get(self.code, 400)


# Images whose header was read (`_header`), by the id of their bytes, for `decode` of the same bytes
# object to take instead of parsing the header again (the size checks before a decode, then the
# decode). Bounded: bytes that are never decoded (a request refused in between) are dropped in time.
_opened: dict[int, tuple[bytes, Image.Image]] = {}
_OPENED_MAX = 64


def _header(data: bytes) -> Image.Image | None:
    """The image of `data` with its header read (nothing decoded), held for `decode`; opened once
    per bytes object. None when the header cannot be read."""
    held = _opened.get(id(data))
    if held is not None and held[0] is data:
        return held[1]
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - whatever the bytes are, decode() says what is wrong with them
        return None
    if len(_opened) >= _OPENED_MAX:
        _opened.clear()
    _opened[id(data)] = (data, image)  # the bytes are kept with it, so their id names them while held
    return image


def header_pixels(data: bytes) -> int | None:
    """Width x height from the image's header (nothing decoded); None when it cannot be read."""
    image = _header(data)
    return None if image is None else image.size[0] * image.size[1]


# The segments a plain JPEG may carry before its first scan (`plain_jpeg`): JFIF's APP0, the
# quantization and Huffman tables, the restart interval, comments; its frame is SOF0 or SOF1.
_PLAIN_SEGMENTS = frozenset((0xE0, 0xDB, 0xC4, 0xDD, 0xFE))
_SEQUENTIAL_FRAMES = frozenset((0xC0, 0xC1))
PLAIN_MAX_SEGMENTS = 32  # an encoder writes about ten; a walk never takes longer than this many steps


def plain_jpeg(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a plain JPEG, read by walking its segments up to the first scan (nothing
    decoded); None for anything else. Plain:
    - one sequential frame (baseline or extended Huffman), 8-bit, grey or colour (1 or 3
      components), and no more scans than components: a progressive JPEG, or one that repeats
      its scans, may pass over the whole picture thousands of times within a few KiB;
    - before the scan no segment but JFIF's, tables, a restart interval and comments: no EXIF
      (so no orientation to apply), no colour profile, no Adobe transform, no extra pictures (MPO);
    - at most PLAIN_MAX_SEGMENTS segments, so the walk is short whatever the bytes."""
    if data[:2] != b"\xff\xd8":
        return None
    size, components, pos, end = None, 0, 2, len(data)
    for _ in range(PLAIN_MAX_SEGMENTS):
        if pos + 4 > end or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        length = (data[pos + 2] << 8) | data[pos + 3]
        segment = pos + 4
        pos += 2 + length
        if length < 2 or pos > end:
            return None
        if marker == 0xDA:  # the first scan: the header is over
            # a sequential JPEG has a scan for all components or one each (a marker cannot hide in a
            # scan's data: a 0xFF byte there is followed by 0); more would repeat passes over the picture
            return size if size is not None and data.count(b"\xff\xda", segment - 4) <= components else None
        if marker in _SEQUENTIAL_FRAMES:
            if size is not None or length < 8 or data[segment] != 8 or data[segment + 5] not in (1, 3):
                return None
            height, width = (data[segment + 1] << 8) | data[segment + 2], (data[segment + 3] << 8) | data[segment + 4]
            if not (width and height):
                return None
            size, components = (width, height), data[segment + 5]
        elif marker not in _PLAIN_SEGMENTS or marker == 0xE0 and not _jfif(data, segment, length):
            return None
    return None


def _jfif(data: bytes, segment: int, length: int) -> bool:
    """Whether the APP0 segment at `segment` is JFIF's, whole (Pillow refuses one shorter than its 14 bytes)."""
    return length >= 16 and data[segment:segment + 5] == b"JFIF\0"


def jpeg_pixels(data: bytes, size: int) -> np.ndarray | None:
    """The RGB uint8 (size, size, 3) pixels of a plain JPEG (`plain_jpeg`) of exactly that size,
    decoded by libjpeg-turbo directly (simplejpeg), as `to_pixels(decode(data))` gives them, in a
    seventh of the time (tests/test_imaging.py holds the two to the same bytes); None for any other
    image, or where simplejpeg is not installed or reports anything wrong with the bytes (then
    `decode` reads them with Pillow and says what is wrong)."""
    if simplejpeg is None or plain_jpeg(data) != (size, size):
        return None
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except Exception:  # noqa: BLE001 - Pillow's decode answers for these bytes
        return None
    _opened.pop(id(data), None)  # a header read for these bytes (a size check) is not needed now
    return pixels


def _open(data: bytes) -> Image.Image:
    """The image of `data`, its header read: the one `_header` opened for this very object, if held."""
    held = _opened.pop(id(data), None)
    if held is not None and held[0] is data:
        return held[1]
    return Image.open(io.BytesIO(data))


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int = DEFAULT_MAX_SIDE,
           target_size: int | None = None) -> Image.Image:
    """Decode and fully load an image, upright, in the mode Pillow gives it (see `to_rgb`).

    Refuses empty, unknown, unsupported, truncated and malformed bytes, and images over
    `max_pixels` or with a side over `max_side`, checked from the header before decoding.
    `target_size` is the side the caller will resize to: a JPEG much larger than that is
    decoded at a reduced scale that keeps both sides at least `target_size`. Multi-picture
    files give their first picture. (Pillow's own bomb guard, 2 x Image.MAX_IMAGE_PIXELS,
    still refuses larger images when max_pixels is set above it.) Peak memory, with
    `to_pixels`: PEAK_BYTES_PER_PIXEL x max_pixels (see the module docstring).
    """
    if not data:
        raise ImageError("empty_body", "the request carries no image bytes")
    with _decoder_errors(max_pixels):
        image = _open(data)  # reads the header only
        _check_format(image)
        _check_size(image.size, max_pixels, max_side)
        if target_size is not None:
            image.draft(image.mode, (target_size, target_size))  # no-op for formats other than JPEG
        image.load()  # decodes now, so truncation is caught here rather than later
        _turn_upright(image)  # phone pictures are stored sideways
    return image


def _turn_upright(image: Image.Image) -> None:
    """Apply the EXIF Orientation tag in place, in every format whose EXIF Pillow reads: a JPEG's
    (or MPO's) APP1 segment, a PNG's eXIf chunk (before or after the pixels: load() has read the
    whole file), a WebP's EXIF chunk. Pillow's TIFF reader applies a TIFF's own tag on load.

    Not ImageOps.exif_transpose: after turning the picture it rewrites the whole EXIF block, and
    that raises on any tag of an unexpected type, which would refuse a rotated picture for metadata
    nobody reads (served when stored upright). An EXIF block Pillow cannot parse is ignored as a
    browser ignores it: the picture is classified as stored. Parsing costs about the block's size
    (Pillow 13 reads no more tag data than the block holds; 10.3 read each tag's data anew, and
    held 400 MB for a 150 kB PNG whose 4000 tags all pointed at the same 100 kB).
    """
    try:
        exif = image.getexif()
        orientation = exif.get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - struct.error, SyntaxError, ValueError...: unreadable metadata, not pixels
        return
    # An integer tag only (as the demo page reads it); a float or fraction that equals 6 is no orientation.
    method = UPRIGHT.get(orientation) if type(orientation) is int else None
    if method is not None:
        image.im = image.im.transpose(method)  # as exif_transpose(in_place=True) does: keeps format and frames
        image._size = image.im.size
        del exif[ExifTags.Base.Orientation]  # applied: a later exif_transpose must not turn it again


@contextlib.contextmanager
def _decoder_errors(max_pixels: int) -> Iterator[None]:
    """Turn whatever Pillow raises into an ImageError: a bad upload is the client's error, not a 500."""
    try:
        yield
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "the bytes are not an image in a format this server can read") from None
    except Image.DecompressionBombError:
        raise ImageError("image_too_large", f"the image is larger than the limit of {max_pixels} pixels") from None
    except Exception as exc:  # noqa: BLE001 - decoders raise TypeError, KeyError, struct.error, MemoryError...
        # Sizes were checked before decoding, so even MemoryError means fields that lie, not a big picture.
        reason = str(exc) or type(exc).__name__
        raise ImageError("corrupt_image", f"the image could not be decoded: {reason}") from None


def _check_format(image: Image.Image) -> None:
    if image.format not in SUPPORTED_FORMATS:
        accepted = ", ".join(sorted(SUPPORTED_FORMATS))
        raise ImageError("unsupported_image_format", f"image format {image.format} is not supported; send one of {accepted}")


def _check_size(size: tuple[int, int], max_pixels: int, max_side: int) -> None:
    """Both limits matter: the pixel count bounds the picture, the side bounds Pillow's per-row overhead."""
    width, height = size
    if width < 1 or height < 1:
        raise ImageError("corrupt_image", "the image has no pixels")
    if max(width, height) > max_side:
        raise ImageError("image_too_large", f"image is {width}x{height} pixels; the limit is {max_side} pixels a side")
    if width * height > max_pixels:
        raise ImageError("image_too_large", f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")


def to_pixels(image: Image.Image, size: int) -> np.ndarray:
    """RGB uint8 array (size, size, 3), resized bilinearly where the image is another size."""
    image = to_rgb(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow decodes -> 8-bit RGB, transparency composited over BACKGROUND.

    16-bit grey (I;16, I;16B, I;16L, I;16N) keeps its high byte; I (32-bit int, which Pillow
    uses for 16-bit grey too) is clipped to 0..65535 and then keeps its high byte; F (float)
    is read as 0..1 when no value exceeds 1, else as 0..255, then clipped (NaN -> 0). Colour
    spaces (CMYK, YCbCr, LAB, HSV) and palettes convert with Pillow.
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = _wide_grey_to_l(image)
    if image.mode == "La":  # premultiplied alpha, which Pillow cannot turn into RGBA directly
        image = image.convert("LA")
    if image.has_transparency_data:
        return _composite(image if image.mode == "RGBA" else image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit int or float grey -> 8-bit grey (Pillow's own conversion clips at 255, so all white)."""
    values = np.array(image)  # a writable copy, so the steps below need no more full-size arrays
    if image.mode == "F":
        np.nan_to_num(values, copy=False, nan=0.0)
        if values.size and values.max() <= 1.0:
            values *= 255.0
        np.clip(values, 0.0, 255.0, out=values)
        np.rint(values, out=values)
    else:
        np.clip(values, 0, 65535, out=values)
        values >>= 8
    return Image.fromarray(values.astype(np.uint8))


def _composite(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, BACKGROUND)
    background.paste(rgba, mask=rgba)  # the RGBA image is its own mask: its alpha band
    return background


def to_input(pixels: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32, scaled and normalised as the manifest says; or a
    batch, (N, H, W, 3) -> (N, 3, H, W), each image's values the same as on its own."""
    x = pixels.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))
