"""CIFAR-10 for a machine with internet: the official archive, checked, unpacked for `--data`.

    .venv/bin/python -m training.download data/                 # -> data/cifar-10-batches-py
    .venv/bin/instanas-train all --config cifar10-cpu --data data/cifar-10-batches-py --out runs/cifar10

The archive is torchvision's source (the same `cifar-10-batches-py` folder torchvision's CIFAR10
dataset downloads), checked against its published MD5 before anything is unpacked; a folder
already there is kept. `--url` and `--md5` point it elsewhere (a mirror, or a file:// URL on a
machine without internet). training/data.py reads the folder as it reads torchvision's.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"  # as published with the archive (and checked by torchvision)
FOLDER = "cifar-10-batches-py"


def download(dest: Path, url: str = URL, md5: str = MD5) -> Path:
    """`dest`/cifar-10-batches-py, downloaded, checked and unpacked unless it is there already."""
    folder = dest / FOLDER
    if (folder / "batches.meta").exists():
        return folder
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        archive = Path(tmp) / "cifar-10-python.tar.gz"
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        digest = hashlib.md5(archive.read_bytes()).hexdigest()
        if digest != md5:
            raise ValueError(f"{url}: MD5 {digest}, expected {md5}: the download is damaged or not CIFAR-10")
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.split("/")[0] == FOLDER and (m.isfile() or m.isdir())]
            if not any(m.name == f"{FOLDER}/batches.meta" for m in members):
                raise ValueError(f"{url}: no {FOLDER}/batches.meta in the archive")
            tar.extractall(tmp, members=members, filter="data")
        (Path(tmp) / FOLDER).rename(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dest", type=Path, help="the folder to put cifar-10-batches-py in")
    parser.add_argument("--url", default=URL)
    parser.add_argument("--md5", default=MD5)
    args = parser.parse_args(argv)
    try:
        folder = download(args.dest, args.url, args.md5)
    except (OSError, ValueError) as exc:
        print(f"download: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
