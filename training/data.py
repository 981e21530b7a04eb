"""Datasets: image-folder trees, tar(.gz) archives of class folders, torchvision's CIFAR pickles.

Every source is decoded once (with the service's own decoder, so training sees
images prepared as serving prepares them) into a uint8 array cached under
`~/.cache/instanas`. Batches are augmented on whole tensors (random crop with
padding, horizontal flip, cutout), which keeps 2 CPU cores busy on the model
instead of on a per-image data pipeline.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from service import imaging
from service.bundle import sha256_file

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass
class ImageSet:
    """Images as (N, H, W, 3) uint8, labels as (N,) int64, class names in label order."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int | None, seed: int = 0) -> "ImageSet":
        """A class-balanced-in-expectation random subset (all of it when count is None)."""
        if count is None or count >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:count])
        return ImageSet(self.images[idx], self.labels[idx], self.classes, self.source)


    def split(self, count: int, seed: int = 0) -> tuple["ImageSet", "ImageSet"]:
        """(rest, held out): `count` images per the same share of every class held out at random."""
        if not 0 <= count < len(self):
            raise ValueError(f"cannot hold out {count} of {len(self)} images")
        rng = np.random.default_rng(seed)
        held = []
        for label in np.unique(self.labels):
            members = np.flatnonzero(self.labels == label)
            take = int(round(count * len(members) / len(self)))
            held.append(rng.permutation(members)[:take])
        held_idx = np.sort(np.concatenate(held)) if held else np.array([], np.int64)
        keep = np.setdiff1d(np.arange(len(self)), held_idx)
        return (ImageSet(self.images[keep], self.labels[keep], self.classes, self.source),
                ImageSet(self.images[held_idx], self.labels[held_idx], self.classes, self.source + ":val"))


class ChecksumError(ValueError, RuntimeError):
    """A data file does not match its SHA256SUMS line (a ValueError, so the CLI reports it)."""


class DataError(ValueError):
    """A dataset that cannot be trained on (unreadable or undecodable images, an empty class);
    the message names the files. Raised while loading, before any training step."""


def verify_checksum(path: Path) -> str:
    """Check `path` against a SHA256SUMS file beside it, where there is one; return its sha256."""
    actual = sha256_file(path)
    sums = path.parent / "SHA256SUMS"
    if sums.exists():
        expected = {}
        for line in sums.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                expected[parts[1].lstrip("*")] = parts[0]
        if path.name in expected and expected[path.name] != actual:
            raise ChecksumError(f"{path}: sha256 {actual} does not match {expected[path.name]} in {sums}")
    return actual


def _cache_dir() -> Path:
    root = Path(os.environ.get("INSTANAS_CACHE", Path.home() / ".cache" / "instanas"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _decode_all(items: list[tuple[str, str, bytes]], size: int, desc: str) -> ImageSet:
    """items: (class name, file name, image bytes); classes are numbered in sorted order. Every
    image is decoded before DataError lists those that could not be."""
    classes = sorted({c for c, *_ in items})
    index = {c: i for i, c in enumerate(classes)}
    images = np.empty((len(items), size, size, 3), np.uint8)
    labels = np.empty(len(items), np.int64)
    bad = []
    for i, (cls, name, data) in enumerate(tqdm(items, desc=f"decode {desc}", unit="img", mininterval=2)):
        try:
            images[i] = imaging.to_pixels(imaging.decode(data), size)
        except imaging.ImageError as exc:
            bad.append(f"{name}: {exc}")
        labels[i] = index[cls]
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(f"{desc}: {len(bad)} of {len(items)} images cannot be decoded:\n  {shown}")
    return ImageSet(images, labels, classes, desc)


def _check_classes(desc: str, folders: set[str], filled: set[str]) -> None:
    """Every class folder (`folders`) must be among those holding an image (`filled`)."""
    empty = sorted(folders - filled)
    if empty:
        raise DataError(f"{desc}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
                        f"{'have' if len(empty) > 1 else 'has'} no images (.jpg, .jpeg, .png, .bmp, .webp)")


def _read_archive(path: Path) -> list[tuple[str, str, bytes]]:
    items, folders = [], set()
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                p = Path(member.name)
                if member.isdir() and len(p.parts) >= 2:
                    folders.add(p.name)  # <split>/<class>/
                if member.isfile() and p.suffix.lower() in _IMAGE_SUFFIXES and len(p.parts) >= 2:
                    items.append((p.parent.name, member.name, tar.extractfile(member).read()))
    except Exception as exc:  # noqa: BLE001 - TarError, EOFError, zlib.error... from a damaged archive
        raise DataError(f"{path}: the archive cannot be read ({type(exc).__name__}: {exc})") from None
    _check_classes(str(path), folders, {c for c, *_ in items})
    return sorted(items, key=lambda it: it[0])


def _read_folder(path: Path) -> list[tuple[str, str, bytes]]:
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in _IMAGE_SUFFIXES)
    items, unreadable = [], []
    for f in files:
        try:
            items.append((f.parent.name, str(f.relative_to(path)), f.read_bytes()))
        except OSError as exc:
            unreadable.append(f"{f}: {exc.strerror or exc}")
    if unreadable:
        raise DataError(f"{path}: {len(unreadable)} images cannot be read:\n  " + "\n  ".join(unreadable[:10]))
    folders = {d.name for d in path.iterdir() if d.is_dir()}
    _check_classes(str(path), folders, {f.relative_to(path).parts[0] for f in files})
    return items


def _read_cifar_pickles(path: Path, split: str) -> ImageSet:
    """torchvision's `cifar-10-batches-py` or `cifar-100-python` folder."""
    if (path / "batches.meta").exists():
        names = ["test_batch"] if split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
        meta, key, label_key = path / "batches.meta", "label_names", b"labels"
    else:
        names, meta, key, label_key = [split], path / "meta", "fine_label_names", b"fine_labels"
    data, labels = [], []
    for name in names:
        with open(path / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data.append(batch[b"data"])
        labels.extend(batch[label_key])
    with open(meta, "rb") as f:
        classes = [c.decode() if isinstance(c, bytes) else c for c in pickle.load(f, encoding="latin1")[key]]
    images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return ImageSet(images, np.asarray(labels, np.int64), classes, f"{path}:{split}")


def load(source: str | Path, *, split: str = "train", size: int = 32) -> ImageSet:
    """Load a split from a data root (holding `<split>.tar.gz` or `<split>/`), an archive, a folder,
    or a torchvision CIFAR pickle folder; decoded arrays are cached by content hash."""
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "batches.meta").exists() or (path / "meta").exists()):
        images = _read_cifar_pickles(path, split)
        if size != 32:
            raise ValueError("CIFAR pickles are 32x32; use input size 32")
        return images
    if path.is_dir():
        for candidate in (path / f"{split}.tar.gz", path / f"{split}.tgz", path / f"{split}.tar", path / split):
            if candidate.exists():
                path = candidate
                break
    if not path.exists():
        raise FileNotFoundError(f"no {split} data at {source}: expected an archive, a class-folder tree or CIFAR pickles")
    if path.is_file():
        key = verify_checksum(path)
        reader = _read_archive
    else:
        key = hashlib.sha256("\n".join(str(f.relative_to(path)) + str(f.stat().st_size)
                                       for f in sorted(path.rglob("*")) if f.is_file()).encode()).hexdigest()
        reader = _read_folder
    cache = _cache_dir() / f"{key[:16]}-{size}.npz"
    if cache.exists():
        try:
            with np.load(cache) as z:
                return ImageSet(z["images"], z["labels"], [str(c) for c in z["classes"]], str(path))
        except Exception:  # noqa: BLE001 - a damaged cache file is decoded again
            cache.unlink(missing_ok=True)
    items = reader(path)
    if not items:
        raise FileNotFoundError(f"no {split} images at {source}: expected <class>/<image> files, "
                                f"a {split}.tar.gz or a {split}/ folder")
    images = _decode_all(items, size, str(path))
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")  # this process's own: torchrun ranks decode at once
    np.savez(tmp, images=images.images, labels=images.labels, classes=np.array(images.classes))
    tmp.replace(cache)
    return images


def channel_statistics(images: ImageSet) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each channel's mean and standard deviation over `images`, on the 0-1 pixel scale (4 decimals)."""
    pixels = images.images.reshape(-1, images.images.shape[-1])
    total = np.zeros(pixels.shape[1]), np.zeros(pixels.shape[1])
    for start in range(0, len(pixels), 1 << 22):  # chunks: float64 sums without a float copy of every pixel
        chunk = pixels[start:start + (1 << 22)].astype(np.float64) / 255
        total[0][:] += chunk.sum(0)
        total[1][:] += (chunk ** 2).sum(0)
    mean = total[0] / len(pixels)
    std = np.sqrt(np.maximum(total[1] / len(pixels) - mean ** 2, 0))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, epoch, batch), independent for each tuple."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class Batches:
    """Shuffled, augmented, normalised mini-batches over an ImageSet, as float32 NCHW tensors.

    `epoch(e, start)` is a pure function of (seed, e, batch index): the image order comes
    from (seed, e) and each batch's augmentation from (seed, e, b), so a run resumed at any
    step sees exactly the batches an uninterrupted one would. With `world > 1`, rank `rank`
    takes every world-th batch of the same order (disjoint shards of each epoch).
    """

    def __init__(self, data: ImageSet, batch_size: int, *, mean, std, train: bool, cutout: int = 16,
                 cutout_epochs: int | None = None, pad: int = 4, seed: int = 0, drop_last: bool | None = None,
                 rank: int = 0, world: int = 1):
        """`cutout_epochs`: the epochs (from 0) whose batches get cutout; later epochs none (None: every epoch)."""
        self.data, self.batch_size, self.train = data, batch_size, train
        self.cutout, self.cutout_epochs, self.pad, self.seed = cutout, cutout_epochs, pad, seed
        self.rank, self.world = rank, world
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.drop_last = train if drop_last is None else drop_last
        self._images = torch.from_numpy(data.images)
        self._labels = torch.from_numpy(data.labels)

    def _total(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        """Batches this rank takes in one epoch."""
        total = self._total()
        return total // self.world if self.world > 1 else total

    def __iter__(self):
        return self.epoch(0)

    def epoch(self, epoch: int, start: int = 0):
        """This rank's batches of epoch `epoch`, from its batch `start` on."""
        n = len(self.data)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)))
                 if self.train else torch.arange(n))
        cutout = self.cutout if self.cutout_epochs is None or epoch < self.cutout_epochs else 0
        for i in range(start, len(self)):
            b = i * self.world + self.rank
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = self._images[idx]
            if self.train:
                x = self._augment(x, torch.Generator().manual_seed(derive_seed(self.seed, epoch, b)), cutout)
            yield self.normalise(x), self._labels[idx]

    def normalise(self, x_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        x = x_uint8_nhwc.permute(0, 3, 1, 2).to(torch.float32) * (1 / 255)
        return ((x - self.mean) / self.std).contiguous()

    def _augment(self, x: torch.Tensor, g: torch.Generator, cutout: int) -> torch.Tensor:
        n, h, w, _ = x.shape
        if self.pad:
            padded = torch.nn.functional.pad(x, (0, 0, self.pad, self.pad, self.pad, self.pad))
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
            rows = (dy[:, None] + torch.arange(h))[:, :, None]
            cols = (dx[:, None] + torch.arange(w))[:, None, :]
            x = padded[torch.arange(n)[:, None, None], rows, cols]
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        if cutout:
            cy = torch.randint(0, h, (n,), generator=g)[:, None, None]
            cx = torch.randint(0, w, (n,), generator=g)[:, None, None]
            ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
            half = cutout // 2
            hole = ((ys >= cy - half) & (ys < cy + cutout - half) & (xs >= cx - half) & (xs < cx + cutout - half))
            x = x.masked_fill(hole[..., None], 0)
        return x
