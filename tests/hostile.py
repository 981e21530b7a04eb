"""Helpers for the hostile-input tests: crafted images, a raw HTTP/1.1 client, server memory."""

from __future__ import annotations

import io
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image


def picture(size: tuple[int, int] = (32, 32), seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    data = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(data[..., 0] if channels == 1 else data, mode)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def jpeg(seed: int = 0) -> bytes:
    return encode(picture(seed=seed), "JPEG", quality=90)


def smooth(size: tuple[int, int]) -> Image.Image:
    """A large picture that compresses to a small file (a gradient)."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), np.full((h, w), 128.0)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def png_of_size(width: int, height: int) -> bytes:
    """A valid grey PNG of any size, written directly (zeros compress about 1000:1)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * width
    parts = [raw.compress(row) for _ in range(height)]
    idat = b"".join(parts) + raw.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def png_with_ztxt_bomb() -> bytes:
    """A 32x32 PNG whose zTXt chunk inflates to 64 MB."""
    png = encode(picture(), "PNG")
    text = b"Comment\x00\x00" + zlib.compress(b"\x00" * (64 << 20), 9)
    crc = struct.pack(">I", zlib.crc32(b"zTXt" + text) & 0xFFFFFFFF)
    chunk = struct.pack(">I", len(text)) + b"zTXt" + text + crc
    return png[:33] + chunk + png[33:]  # after the signature and IHDR


def gif_with_huge_screen() -> bytes:
    gif = bytearray(encode(picture(mode="L"), "GIF"))
    gif[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen width, height
    return bytes(gif)


def tiff_with_bad_ifd() -> bytes:
    tiff = bytearray(encode(picture(), "TIFF"))
    tiff[4:8] = struct.pack("<I", 0x7FFFFFF0)  # first IFD offset far past the end
    return bytes(tiff)


def tiff_with_lying_strips() -> bytes:
    """A TIFF whose strip offsets point past the end of the file."""
    image = picture((64, 64))
    tiff = bytearray(encode(image, "TIFF"))
    # Pillow writes StripOffsets (tag 273); make every offset point far away.
    ifd = struct.unpack("<I", tiff[4:8])[0]
    count = struct.unpack("<H", tiff[ifd:ifd + 2])[0]
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, typ, n = struct.unpack("<HHI", tiff[entry:entry + 8])
        if tag == 273 and n == 1:
            tiff[entry + 8:entry + 12] = struct.pack("<I", 0x7FFFFF00)
    return bytes(tiff)


def png_16bit() -> bytes:
    values = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60)
    return encode(Image.fromarray(values), "PNG")  # uint16: mode I;16


def jpeg_with_exif_rotation() -> bytes:
    image = picture((48, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90
    return encode(image, "JPEG", exif=exif.tobytes())


ORIENTATION = 0x0112  # the EXIF tag


def as_stored(upright: Image.Image, orientation: int) -> Image.Image:
    """The picture a camera stores, with this EXIF orientation, for what a viewer shows as `upright`.
    Written from the EXIF definitions (where the stored first row and column belong), not with
    Pillow's transpositions, so that it checks them."""
    d = np.asarray(upright)
    stored = {
        1: d,
        2: d[:, ::-1],  # first column on the right: mirrored
        3: d[::-1, ::-1],  # first row at the bottom, first column on the right: turned 180 degrees
        4: d[::-1],  # first row at the bottom: flipped
        5: d.swapaxes(0, 1),  # first row on the left, first column at the top: transposed
        6: np.rot90(d, 1),  # first row on the right: shown after a clockwise quarter turn
        7: d[::-1, ::-1].swapaxes(0, 1),  # first row on the right, first column at the bottom
        8: np.rot90(d, -1),  # first row on the left, first column at the bottom: an anticlockwise turn
    }[orientation]
    return Image.fromarray(np.ascontiguousarray(stored))


def exif_with(entries: list[tuple[int, int, int, bytes]], data: bytes = b"") -> bytes:
    """A big-endian EXIF (TIFF) block, no 'Exif' prefix: IFD0 of (tag, type, count, 4-byte value or
    offset) entries, then `data` (from offset 14 + 12 x entries)."""
    ifd = struct.pack(">H", len(entries)) + b"".join(struct.pack(">HHI", t, k, n) + v for t, k, n, v in entries)
    return b"MM\x00\x2a" + struct.pack(">I", 8) + ifd + struct.pack(">I", 0) + data


def orientation_exif(orientation: int) -> bytes:
    return exif_with([(ORIENTATION, 3, 1, struct.pack(">HH", orientation, 0))])  # one SHORT


def png_with_exif(image: Image.Image, exif: bytes, after_pixels: bool = False) -> bytes:
    """A PNG with an eXIf chunk ahead of its pixels (where Pillow writes it) or after them (which
    the PNG specification allows, and Chromium does not read)."""
    png = encode(image, "PNG")
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif) & 0xFFFFFFFF)
    at = len(png) - 12 if after_pixels else 33  # before IEND, or after the signature and IHDR
    return png[:at] + chunk + png[at:]


def rotated_by_exif(fmt: str, orientation: int = 6, upright: Image.Image | None = None) -> bytes:
    """`upright` (48x24 noise by default) stored as a camera would with this orientation, losslessly."""
    stored = as_stored(picture((48, 24)) if upright is None else upright, orientation)
    if fmt == "PNG after pixels":
        return png_with_exif(stored, orientation_exif(orientation), after_pixels=True)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(stored, fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))


def png_rotated_with_mistyped_exif() -> bytes:
    """Orientation 6, and XResolution (a RATIONAL) written as ASCII, which Pillow reads and cannot write back."""
    exif = exif_with([(ORIENTATION, 3, 1, struct.pack(">HH", 6, 0)), (0x011A, 2, 8, struct.pack(">I", 38))],
                     b"seventy\x00")
    return png_with_exif(as_stored(picture((48, 24)), 6), exif)


def jpeg_with_bad_exif() -> bytes:
    """A JPEG whose EXIF block is garbage (an APP1 segment 'Exif' followed by noise)."""
    data = jpeg()
    noise = b"Exif\x00\x00" + b"MM\x00\x2a\xff\xff\xff\xff" + bytes(range(256)) * 4
    app1 = b"\xff\xe1" + struct.pack(">H", len(noise) + 2) + noise
    return data[:2] + app1 + data[2:]


def mpo() -> bytes:
    return encode(picture(seed=1), "MPO", save_all=True, append_images=[picture(seed=2)])


def cmyk_jpeg() -> bytes:
    return encode(picture().convert("CMYK"), "JPEG")


def animated_gif(frames: int = 200) -> bytes:
    images = [picture((16, 16), seed=i, mode="L") for i in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:])


def webp_of_size(width: int, height: int) -> bytes:
    return encode(smooth((width, height)), "WEBP", quality=50)


def progressive_jpeg_of_size(width: int, height: int) -> bytes:
    return encode(smooth((width, height)), "JPEG", quality=50, progressive=True)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "hostileboundary",
              closed: bool = True) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data body: parts are (field name, filename or None, bytes)."""
    out = []
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode())
        if filename:
            out.append(b"Content-Type: application/octet-stream\r\n")
        out.append(b"\r\n" + data + b"\r\n")
    if closed:
        out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


# --- a raw HTTP/1.1 client: what httpx will not send --------------------------------------------------


@dataclass
class Reply:
    status: int | None  # None: the server closed the connection without answering
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0

    def json(self):
        import json

        return json.loads(self.body)


def raw_exchange(port: int, steps: list[bytes | float], timeout: float = 10.0) -> Reply:
    """Send `steps` (bytes are sent, floats are pauses in seconds) on one connection, then read
    one response (or the close)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for step in steps:
                if isinstance(step, (int, float)):
                    time.sleep(step)
                else:
                    sock.sendall(step)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed: read what it said
        return read_reply(sock, t0)


def read_reply(sock: socket.socket, t0: float) -> Reply:
    buffer = b""
    try:
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                return Reply(None, seconds=time.monotonic() - t0) if not buffer else _parse(buffer, sock, t0)
            buffer += chunk
    except ConnectionResetError:
        return Reply(None, seconds=time.monotonic() - t0) if not buffer else _parse(buffer, sock, t0)
    return _parse(buffer, sock, t0)


def _parse(buffer: bytes, sock: socket.socket, t0: float) -> Reply:
    head, _, body = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    try:
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        pass
    return Reply(status, headers, body[:length], time.monotonic() - t0)


def request_bytes(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
                  content_length: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if content_length and body and not any(k.lower() in ("content-length", "transfer-encoding") for k in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --- memory of a process ------------------------------------------------------------------------------


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak since start) of a process, in KiB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out
