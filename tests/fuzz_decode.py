"""Coverage-guided fuzzing of the decode path with atheris (libFuzzer for Python).

Every input goes through `imaging.decode` and `imaging.to_pixels`, as an uploaded image does; the
only exception allowed out is `imaging.ImageError` (a 4xx for the client). Anything else, a hang
or a crash ends the run with a non-zero status and the input that did it.

    .venv/bin/python tests/fuzz_decode.py -runs=3000 -max_total_time=120 <corpus dir>

tests/test_fuzz.py runs it with a seed corpus of valid images in each accepted format.
Pillow's Python code (its image plugins) and service/imaging.py are instrumented for coverage.
"""

import sys

import numpy  # noqa: F401 - imported before instrumentation: C code, and slow to instrument
import pydantic  # noqa: F401

import atheris

with atheris.instrument_imports(include=["PIL", "service"]):
    from PIL import Image

    from service import imaging

    Image.init()  # every format plugin imported now, so instrumented (Pillow imports them lazily)

MAX_PIXELS = 1_000_000  # keeps each run cheap; the checks are the same at any limit
# Resident memory allowed after any input. Checked here rather than with libFuzzer's -rss_limit_mb,
# which reads the peak RSS, and a process started from a big one (pytest) inherits that peak.
MAX_RESIDENT_MB = 1024
_PAGE_MB = __import__("os").sysconf("SC_PAGE_SIZE") / 2**20


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE_MB


def test_one_input(data: bytes) -> None:
    try:
        image = imaging.decode(data, max_pixels=MAX_PIXELS, target_size=32)
        imaging.to_pixels(image, 32)
    except imaging.ImageError:
        pass
    resident = _resident_mb()
    if resident > MAX_RESIDENT_MB:
        raise MemoryError(f"{resident:.0f} MB resident after this input (limit {MAX_RESIDENT_MB} MB)")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
