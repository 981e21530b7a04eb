"""service/imaging.py on real encoded files: limits, memory, malformed files, every mode, EXIF, MPO, animations."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from service import imaging
from service.imaging import ImageError, decode, to_pixels, to_rgb
from tests import hostile as h

ROOT = Path(__file__).resolve().parent.parent
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def blank_png(width: int, height: int, channels: int = 1, rows: int | None = None) -> bytes:
    """A PNG of 8-bit zeros, streamed row by row: Pillow would need the whole picture in memory
    to write one (1.4 GB for 1 x 40 M). `rows` < height writes a truncated file, for header-only tests."""
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # grey, grey + alpha, RGB, RGBA
    row = b"\0" * (1 + width * channels)  # filter byte, then the samples
    rows = height if rows is None else rows
    batch = max(1, (1 << 21) // len(row))
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * min(batch, rows - i)) for i in range(0, rows, batch)) + z.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def two_halves(size=(40, 20)) -> Image.Image:
    """Red left half, blue right half: shows which way a picture was turned."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def is_close(pixel, color, tolerance=12) -> bool:
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel, color))


def decode_error(data: bytes, **kwargs) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode(data, **kwargs)
    return info.value


# --- 1. limits from the header, and the memory one decode costs -----------------------------

def test_blank_png_is_a_valid_png():
    image = decode(blank_png(3, 2, channels=4))
    assert (image.format, image.mode, image.size) == ("PNG", "RGBA", (3, 2))
    assert np.asarray(image).max() == 0


def test_sides_and_pixels_are_checked_from_the_header():
    one_row = blank_png(1, 40_000_000, rows=1)  # the header says 40 M pixels; the data is one row
    err = decode_error(one_row)
    assert err.code == "image_too_large" and "16384 pixels a side" in str(err)
    assert decode_error(blank_png(200, 100), max_side=150).code == "image_too_large"
    assert decode_error(blank_png(200, 100), max_pixels=19_999).code == "image_too_large"
    assert decode(blank_png(200, 100), max_side=200, max_pixels=20_000).size == (200, 100)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets the module's filter
def test_bomb_messages_quote_the_configured_limit():
    # 90 M pixels: past Pillow's warning threshold (89 M), which used to become the error message.
    err = decode_error(blank_png(9500, 9500, rows=1))
    assert err.code == "image_too_large" and "40000000" in str(err) and "89478485" not in str(err)
    # 192 M pixels: past Pillow's hard limit, raised inside Image.open before our own check.
    err = decode_error(blank_png(16_000, 12_000, rows=1), max_pixels=50_000_000)
    assert err.code == "image_too_large" and "50000000" in str(err) and "178956970" not in str(err)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_limit_above_pillows_warning_threshold_is_honoured():
    image = decode(blank_png(9500, 9500), max_pixels=100_000_000)
    assert image.size == (9500, 9500)


def test_target_size_decodes_big_jpegs_at_reduced_scale_but_never_below_it():
    data = encode(Image.new("RGB", (1000, 600), RED), "JPEG")
    assert decode(data).size == (1000, 600)
    assert decode(data, target_size=32).size == (125, 75)  # 1/8: both sides still >= 32
    assert decode(data, target_size=100).size == (250, 150)  # 1/4, as 1/8 would give 75 < 100
    assert decode(data, target_size=600).size == (1000, 600)  # no reduction keeps both sides >= 600
    assert decode(encode(Image.new("RGB", (1000, 600), RED), "PNG"), target_size=32).size == (1000, 600)


# Runs in a fresh interpreter, so ru_maxrss (the peak resident size, KiB on Linux) is this decode's alone.
_MEASURE = """
import json, resource, sys, time
from service import imaging
data = open(sys.argv[1], "rb").read()
target_size = json.loads(sys.argv[2])
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before, start = peak(), time.perf_counter()
try:
    imaging.to_pixels(imaging.decode(data, target_size=target_size), 32)
    outcome = "ok"
except imaging.ImageError as exc:
    outcome = exc.code
print(json.dumps({"outcome": outcome, "grew": peak() - before, "seconds": time.perf_counter() - start}))
"""

SIDE = 6324  # 6324 x 6324 = 39.99 M pixels, just under the default limit
FIXED_BYTES = 48 << 20  # the formula's "few MB of fixed buffers", with room for allocator noise
SECONDS = 20  # generous: these take about a second on one core

# name: (file maker, target_size, outcome, bytes the decode may add to the peak RSS)
WORST_CASES = {
    "png 1x40M pixels": (lambda: blank_png(1, 40_000_000), None, "image_too_large", FIXED_BYTES),
    "png 2441x16384 grey, the tallest allowed": (lambda: blank_png(2441, 16_384), None, "ok", None),
    "png 6324x6324 rgba": (lambda: blank_png(SIDE, SIDE, channels=4), None, "ok", None),
    "png 6324x6324 grey+alpha": (lambda: blank_png(SIDE, SIDE, channels=2), None, "ok", None),
    "progressive cmyk jpeg 6324x6324": (
        lambda: encode(Image.new("CMYK", (SIDE, SIDE), (0, 90, 90, 0)), "JPEG", progressive=True), None, "ok", None),
    "lossless webp 6324x6324": (
        lambda: encode(Image.new("RGB", (SIDE, SIDE), RED), "WEBP", lossless=True, method=0), None, "ok", None),
    "jpeg 6324x6324 with target_size": (
        lambda: encode(Image.new("RGB", (SIDE, SIDE), RED), "JPEG"), 32, "ok", FIXED_BYTES),
}


@pytest.mark.parametrize("name", list(WORST_CASES))
def test_worst_inputs_stay_under_the_memory_formula(name, tmp_path):
    make, target_size, outcome, budget = WORST_CASES[name]
    data = make()
    assert len(data) < 2_000_000  # small files, huge pictures
    path = tmp_path / "image"
    path.write_bytes(data)
    with Image.open(path) as header:
        pixels = header.size[0] * header.size[1]
    if budget is None:
        budget = imaging.PEAK_BYTES_PER_PIXEL * pixels + FIXED_BYTES
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(path), json.dumps(target_size)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["outcome"] == outcome
    assert result["grew"] <= budget, f"{result['grew'] / 2**20:.0f} MiB > {budget / 2**20:.0f} MiB"
    assert result["seconds"] < SECONDS


# --- 2. malformed files and every decoder exception -> ImageError ----------------------------

def tiff_with_wrong_strip_offsets_type() -> bytes:
    """A little-endian TIFF whose StripOffsets (tag 273) claims type RATIONAL instead of LONG."""
    data = bytearray(encode(Image.new("RGB", (8, 8), RED), "TIFF"))
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] == 273:
            struct.pack_into("<H", data, entry + 2, 5)
            return bytes(data)
    raise AssertionError("no StripOffsets tag")


def test_malformed_tiff_is_corrupt_not_a_server_error():
    err = decode_error(tiff_with_wrong_strip_offsets_type())  # Pillow raises TypeError here
    assert (err.code, err.status) == ("corrupt_image", 400)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_truncated_files_are_corrupt(fmt):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    err = decode_error(data[: len(data) // 2])
    assert (err.code, err.status) == ("corrupt_image", 400)


@pytest.mark.parametrize("exc", [TypeError("t"), KeyError("k"), IndexError("i"), struct.error("s"),
                                 ZeroDivisionError("z"), MemoryError(), EOFError(), OSError("o"),
                                 SyntaxError("s"), ValueError("v"), RuntimeError("r"), AssertionError()],
                         ids=lambda e: type(e).__name__)
def test_any_decoder_exception_is_corrupt_image(exc, monkeypatch):
    data = encode(Image.new("RGB", (8, 8), RED), "PNG")

    def failing_load(self):
        raise exc

    monkeypatch.setattr(ImageFile.ImageFile, "load", failing_load)
    err = decode_error(data)
    assert (err.code, err.status) == ("corrupt_image", 400)
    assert str(err).startswith("the image could not be decoded: ")


# --- 3. every mode -> 8-bit RGB ----------------------------------------------------------------

# (mode to save, format, value) -> (mode Pillow opens, expected RGB of the pixel)
MODES = {
    "1 png": ("1", "PNG", 1, "1", WHITE),
    "L png": ("L", "PNG", 100, "L", (100, 100, 100)),
    "LA png transparent": ("LA", "PNG", (0, 0), "LA", WHITE),
    "LA png half": ("LA", "PNG", (0, 128), "LA", (127, 127, 127)),
    "RGBA png transparent": ("RGBA", "PNG", (200, 100, 50, 0), "RGBA", WHITE),
    "RGBA png opaque": ("RGBA", "PNG", (200, 100, 50, 255), "RGBA", (200, 100, 50)),
    "RGBA webp transparent": ("RGBA", "WEBP", (200, 100, 50, 0), "RGBA", WHITE),
    "RGBA tiff transparent": ("RGBA", "TIFF", (200, 100, 50, 0), "RGBA", WHITE),
    "CMYK jpeg": ("CMYK", "JPEG", (0, 255, 255, 0), "CMYK", RED),
    "CMYK tiff": ("CMYK", "TIFF", (0, 255, 255, 0), "CMYK", RED),
    "YCbCr tiff": ("YCbCr", "TIFF", (255, 128, 128), "YCbCr", WHITE),
    "LAB tiff": ("LAB", "TIFF", (255, 128, 128), "LAB", WHITE),
    "I;16 png": ("I;16", "PNG", 100 * 257, "I;16", (100, 100, 100)),
    "I;16 tiff": ("I;16", "TIFF", 100 * 257, "I;16", (100, 100, 100)),
    "I;16B tiff": ("I;16B", "TIFF", 100 * 257, "I;16B", (100, 100, 100)),
    "I tiff": ("I", "TIFF", 100 * 257, "I", (100, 100, 100)),
    "F tiff 0..1": ("F", "TIFF", 0.5, "F", (128, 128, 128)),
    "F tiff 0..255": ("F", "TIFF", 100.0, "F", (100, 100, 100)),
}


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_becomes_8_bit_rgb(name):
    save_mode, fmt, value, opened_mode, expected = MODES[name]
    image = decode(encode(Image.new(save_mode, (8, 8), value), fmt))
    assert image.mode == opened_mode  # the mode under test really is what Pillow decodes
    pixels = to_pixels(image, 4)
    assert pixels.shape == (4, 4, 3) and pixels.dtype == np.uint8
    assert is_close(pixels[0, 0], expected, tolerance=2), pixels[0, 0]


def test_palettes_with_and_without_transparency():
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, *RED, *BLUE] + [0] * 759)
    for fmt in ("PNG", "GIF", "BMP"):
        assert tuple(to_pixels(decode(encode(palette, fmt)), 2)[0, 0]) == RED
    for fmt in ("PNG", "GIF"):
        image = decode(encode(palette, fmt, transparency=1))
        assert image.mode == "P"
        assert tuple(to_pixels(image, 2)[0, 0]) == WHITE


@pytest.mark.parametrize("mode, value, expected", [
    ("PA", (1, 0), WHITE), ("HSV", (0, 255, 255), RED), ("La", (0, 0), WHITE), ("RGBa", (0, 0, 0, 0), WHITE),
    ("RGBX", (*RED, 0), RED), ("I;16L", 100 * 257, (100, 100, 100)), ("I;16N", 100 * 257, (100, 100, 100)),
])
def test_modes_no_supported_file_carries_convert_too(mode, value, expected):
    image = Image.new(mode, (2, 2), value)
    if mode == "PA":
        image.putpalette([0, 0, 0, *RED] + [0] * 762)
    assert is_close(np.asarray(to_rgb(image))[0, 0], expected, tolerance=1)


def test_16_bit_and_float_pictures_match_their_8_bit_version():
    y, x = np.mgrid[0:48, 0:64]
    grey = ((x * 4 + y * 3) % 256).astype(np.uint8)
    reference = to_pixels(decode(encode(Image.fromarray(grey), "PNG")), 32).astype(int)
    wide = {
        "16-bit png": encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG"),
        "16-bit big-endian tiff": encode(Image.fromarray((grey.astype(np.uint16) * 257).astype(">u2")), "TIFF"),
        "float tiff 0..1": encode(Image.fromarray(grey.astype(np.float32) / 255), "TIFF"),
        "float tiff 0..255": encode(Image.fromarray(grey.astype(np.float32)), "TIFF"),
    }
    for name, data in wide.items():
        pixels = to_pixels(decode(data), 32).astype(int)
        assert np.abs(pixels - reference).max() <= 1, name


def test_plain_rgb_is_prepared_as_before():
    """Training's CIFAR JPEGs take the untouched path: convert nothing, resize bilinearly."""
    noise = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    expected = np.asarray(Image.open(io.BytesIO(data)).resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(to_pixels(decode(data), 32), expected)


def _noise(size, mode="RGB", seed=2) -> Image.Image:
    shape = (size[1], size[0]) + (() if mode == "L" else (3,))
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8), mode)


def _with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """`jpeg` with one more segment right after its start-of-image marker."""
    return jpeg[:2] + bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def test_plain_jpegs_read_directly_are_pillows_pixels(test_jpegs):
    """imaging.jpeg_pixels (libjpeg-turbo through simplejpeg) gives the very bytes that Pillow's
    decode and to_pixels give: real test JPEGs, grey, every chroma subsampling, restart markers,
    comments, qualities. The served path (classification.prepare) takes it for every such image."""
    made = [encode(_noise((32, 32), mode), "JPEG", quality=q, subsampling=sub, **extra)
            for mode in ("RGB", "L") for q in (30, 75, 95) for sub in (0, 1, 2)
            for extra in ({}, {"restart_marker_blocks": 1})]
    made.append(_with_segment(made[0], 0xFE, b"a comment"))
    for data in [jpeg for _, jpeg in test_jpegs] + made:
        assert imaging.plain_jpeg(data) == (32, 32) and imaging.header_pixels(data) == 32 * 32
        pixels = imaging.jpeg_pixels(data, 32)
        assert pixels is not None and pixels.dtype == np.uint8
        assert id(data) not in imaging._opened  # the header Pillow read for the size check is let go
        assert np.array_equal(pixels, to_pixels(decode(data, target_size=32), 32))


def test_only_plain_jpegs_of_the_size_are_read_directly():
    """Anything that is not a plain JPEG of exactly the input's size goes to Pillow: progressive or
    with more scans than components, EXIF (an orientation to apply), a colour profile, CMYK, other
    sizes and formats, and bytes libjpeg-turbo finds wrong, which Pillow then refuses with its own
    reason."""
    plain = encode(_noise((32, 32)), "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    others = {
        "progressive": encode(_noise((32, 32)), "JPEG", progressive=True),
        "exif": encode(_noise((32, 32)), "JPEG", exif=exif.tobytes()),
        "icc profile": _with_segment(plain, 0xE2, b"ICC_PROFILE\0" + bytes(40)),
        "cmyk": encode(Image.new("CMYK", (32, 32), (0, 90, 90, 0)), "JPEG"),
        "png": encode(_noise((32, 32)), "PNG"),
        "not an image": b"hello",
        "header cut": plain[:40],
        "a foreign APP0": _with_segment(plain[:2] + plain[20:], 0xE0, b"JFXX\0" + bytes(8)),
        "too many segments": plain[:2] + b"\xff\xfe\x00\x02" * imaging.PLAIN_MAX_SEGMENTS + plain[2:],
        "a short JFIF segment": _with_segment(plain[:2] + plain[20:], 0xE0, b"JFIF\0"),
        "its scan repeated": plain[:-2] + plain[plain.index(b"\xff\xda"):-2] * 3 + plain[-2:],  # 4 scans, 3 components
    }
    for name, data in others.items():
        assert imaging.plain_jpeg(data) is None, name
        assert imaging.jpeg_pixels(data, 32) is None, name
    assert imaging.plain_jpeg(encode(_noise((48, 40)), "JPEG")) == (48, 40)
    assert imaging.jpeg_pixels(encode(_noise((48, 40)), "JPEG"), 32) is None  # Pillow resizes it
    cut = plain[: len(plain) - 200]  # the scan cut short: libjpeg-turbo warns, so Pillow decides
    assert imaging.plain_jpeg(cut) == (32, 32) and imaging.jpeg_pixels(cut, 32) is None
    assert decode_error(cut).code == "corrupt_image"


# --- 4. EXIF orientation ---------------------------------------------------------------------

@pytest.mark.parametrize("orientation, size, first, last", [
    (1, (40, 20), RED, BLUE),  # stored upright: left red, right blue
    (3, (40, 20), BLUE, RED),  # turned 180 degrees
    (6, (20, 40), RED, BLUE),  # turned 90 degrees clockwise: red on top
    (8, (20, 40), BLUE, RED),  # turned 90 degrees anticlockwise: blue on top
])
def test_exif_orientation_is_applied(orientation, size, first, last):
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = decode(encode(two_halves(), "JPEG", exif=exif))
    assert image.size == size
    width, height = size
    if width > height:  # halves side by side
        first_at, last_at = (width // 4, height // 2), (3 * width // 4, height // 2)
    else:  # halves one above the other
        first_at, last_at = (width // 2, height // 4), (width // 2, 3 * height // 4)
    assert is_close(image.getpixel(first_at), first) and is_close(image.getpixel(last_at), last)


def eight_blocks() -> Image.Image:
    """32x16: two rows of four 8x8 blocks, each its own colour. Every orientation but 1 moves some
    block, and each block is one JPEG DCT block, so even a JPEG keeps the colours nearly exact."""
    colours = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 0, 0),
               (255, 255, 255)]
    blocks = np.array(colours, np.uint8).reshape(2, 4, 1, 1, 3)
    return Image.fromarray(np.broadcast_to(blocks, (2, 4, 8, 8, 3)).transpose(0, 2, 1, 3, 4).reshape(16, 32, 3))


# Every supported format that carries EXIF, lossless where it can be; JPEG and MPO within JPEG_TOLERANCE.
EXIF_FORMATS = {"JPEG": {"quality": 95, "subsampling": 0},
                "MPO": {"quality": 95, "subsampling": 0, "save_all": True, "append_images": [Image.new("RGB", (8, 8))]},
                "PNG": {}, "PNG after pixels": {}, "WEBP": {"lossless": True}, "TIFF": {}}
JPEG_TOLERANCE = 8


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", EXIF_FORMATS)
def test_every_format_carrying_exif_is_turned_upright(fmt, orientation):
    """The picture stored as a camera would for each orientation decodes to the upright picture."""
    upright = np.asarray(eight_blocks())
    stored = h.as_stored(eight_blocks(), orientation)
    if fmt == "PNG after pixels":  # where the specification allows it too; Pillow reads it on load
        data = h.png_with_exif(stored, h.orientation_exif(orientation), after_pixels=True)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(stored, fmt, exif=exif, **EXIF_FORMATS[fmt])
        assert Image.open(io.BytesIO(data)).getexif()[0x0112] == orientation  # Pillow wrote the tag
    image = decode(data, target_size=32)
    assert image.size == (32, 16) and image.format == fmt.split()[0]
    diff = np.abs(np.asarray(image).astype(int) - upright).max()
    assert diff <= (JPEG_TOLERANCE if fmt in ("JPEG", "MPO") else 0), diff


def test_a_turned_picture_is_not_turned_again():
    image = decode(h.rotated_by_exif("PNG", 6))
    assert 0x0112 not in image.getexif()
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(image)), np.asarray(h.picture((48, 24))))


# What service/imaging.py filters in a server (pytest resets a module's filters after collecting it).
QUIET_PILLOW = pytest.mark.filterwarnings(r"ignore::UserWarning:PIL\.TiffImagePlugin")

# EXIF blocks that say no orientation, or nothing readable: the picture is decoded as stored, never
# refused (the pixels are fine) and never a 500.
MEANINGLESS_EXIF = {
    "not EXIF at all": b"not a TIFF header",
    "IFD0 past the end": b"MM\x00\x2a\x7f\xff\xff\xf0",
    "IFD0 cut short": h.orientation_exif(6)[:12],
    "orientation 0": h.orientation_exif(0),
    "orientation 9": h.orientation_exif(9),
    "orientation 65535": h.orientation_exif(65535),
    "orientation in ASCII": h.exif_with([(0x0112, 2, 2, b"6\x00\x00\x00")]),
    "orientation as the fraction 6/1": h.exif_with([(0x0112, 5, 1, struct.pack(">I", 26))], struct.pack(">II", 6, 1)),
    "orientation of 1000 values past the end": h.exif_with([(0x0112, 3, 1000, struct.pack(">I", 0x7FFFFFF0))]),
}


@QUIET_PILLOW
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("name", MEANINGLESS_EXIF)
def test_meaningless_or_unreadable_exif_is_ignored(fmt, name):
    stored = h.as_stored(eight_blocks(), 6)
    options = EXIF_FORMATS[fmt]
    expected = np.asarray(decode(encode(stored, fmt, **options)))  # the same encoding, without EXIF
    image = decode(encode(stored, fmt, exif=b"Exif\x00\x00" + MEANINGLESS_EXIF[name], **options))
    assert np.array_equal(np.asarray(image), expected)


def png_of_many_tags() -> bytes:
    """Orientation 6 among 65535 tags (the most IFD0 holds, 786 kB), each pointing at the same 1000
    bytes: Pillow reads no more tag data than the block holds and skips the rest, one warning each."""
    tags = [(t, 7, 1000, struct.pack(">I", 8)) for t in range(1, 0x10000) if t != 0x0112]
    tags.append((0x0112, 3, 1, struct.pack(">HH", 6, 0)))
    return h.png_with_exif(h.as_stored(h.picture((48, 24)), 6), h.exif_with(sorted(tags)))


@QUIET_PILLOW
def test_orientation_is_applied_whatever_else_the_exif_holds():
    """Pillow reads a tag of an unexpected type but cannot write it back: ImageOps.exif_transpose,
    which rewrites the block, refused such a picture when it was turned, and served it when not."""
    upright = np.asarray(h.picture((48, 24)))
    assert np.array_equal(np.asarray(decode(h.png_rotated_with_mistyped_exif())), upright)
    assert np.array_equal(np.asarray(decode(png_of_many_tags())), upright)


def test_hostile_exif_leaves_no_warnings_behind(tmp_path):
    """Python keeps every distinct warning it shows: a crafted block must neither flood the log nor
    leave one more behind each request (here, an orientation tag of a new length each time). In a
    process of its own, as a server's: pytest resets the warning filters a module sets on import."""
    files = [png_of_many_tags()]
    for count in (3, 4, 5):  # values past the entry, at offset 26
        exif = h.exif_with([(0x0112, 3, count, struct.pack(">I", 26))], b"\x00\x06" * count)
        files.append(h.png_with_exif(h.as_stored(eight_blocks(), 6), exif))
    for i, data in enumerate(files):
        (tmp_path / f"{i}.png").write_bytes(data)
    script = ("import sys; from pathlib import Path; from service.imaging import decode\n"
              "for path in sorted(Path(sys.argv[1]).iterdir()): print(decode(path.read_bytes()).size)")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr[:500]
    assert run.stdout.split("\n")[:4] == ["(48, 24)"] + ["(32, 16)"] * 3  # all turned upright


# --- 5. MPO and animations: the first picture --------------------------------------------------

def test_mpo_is_read_as_its_first_picture():
    data = encode(Image.new("RGB", (640, 480), RED), "MPO", save_all=True,
                  append_images=[Image.new("RGB", (640, 480), BLUE)])
    image = decode(data)
    assert image.format == "MPO" and image.size == (640, 480)
    assert is_close(to_pixels(image, 8)[4, 4], RED)
    assert decode(data, target_size=32).size == (80, 60)  # draft mode works for MPO too


@pytest.mark.parametrize("fmt, params", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})],
                         ids=["gif", "apng", "webp"])
def test_animations_are_read_as_their_first_frame(fmt, params):
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, **params)
    image = decode(data)
    assert getattr(image, "n_frames", 1) == 2
    assert is_close(to_pixels(image, 4)[0, 0], RED)


# --- 6. codes and HTTP statuses ----------------------------------------------------------------

@pytest.mark.parametrize("code, status", [("empty_body", 400), ("not_an_image", 400), ("corrupt_image", 400),
                                          ("image_too_large", 413), ("unsupported_image_format", 415)])
def test_status_follows_the_code(code, status):
    err = ImageError(code, "message")
    assert (err.code, err.status, str(err)) == (code, status, "message")


def test_decode_errors_carry_their_status():
    cases = {
        b"": ("empty_body", 400),
        b"definitely not an image" * 10: ("not_an_image", 400),
        tiff_with_wrong_strip_offsets_type(): ("corrupt_image", 400),
        blank_png(20_000, 10, rows=1): ("image_too_large", 413),
        encode(Image.new("RGB", (8, 8), RED), "PCX"): ("unsupported_image_format", 415),
        encode(Image.new("RGB", (16, 16), RED), "ICO"): ("unsupported_image_format", 415),
    }
    for data, expected in cases.items():
        err = decode_error(data)
        assert (err.code, err.status) == expected, data[:16]


def test_a_batch_of_pixels_scales_and_normalises_as_each_image_alone():
    """imaging.to_input on (N, H, W, 3) gives each image the very values it gets on its own (the
    executor's batch, service/classification.py's batch_of)."""
    from service.manifest import Preprocessing

    pre = Preprocessing(input_size=32, mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.2435, 0.2616))
    batch = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    out = imaging.to_input(batch, pre)
    assert out.shape == (5, 3, 32, 32) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.stack([imaging.to_input(image, pre) for image in batch]))
