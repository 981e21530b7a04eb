"""A user's journeys past the first request, as the README tells them, against real processes.

Own images: a folder of three classes at 64x64 goes through `make train` (the smoke preset), and
the bundle it writes joins a running server beside the default one with one reload, the default
staying pinned (about a minute on 2 cores, most of it the smoke training). The quick start: the
README's `make serve`, its curl command and docs/API.md's tritonclient example, as written but
for the port."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.bundle import read_manifest
from tests.conftest import BIN, ROOT, Server, free_port

CLASSES = ["disc", "stripes", "square"]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _picture(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A noisy picture of `kind` on a random background, in a random colour and place."""
    y, x = np.mgrid[:size, :size]
    (cy, cx), r = rng.uniform(0.3, 0.7, 2) * size, rng.uniform(0.15, 0.3) * size
    if kind == "disc":
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
    elif kind == "square":
        mask = (abs(y - cy) < r) & (abs(x - cx) < r)
    else:
        mask = ((x + y) // max(2, int(r / 2))) % 2 == 0
    image = rng.uniform(0, 90, (size, size, 3)) + rng.uniform(0, 60, 3)
    image[mask] = rng.uniform(150, 255, 3) + rng.normal(0, 10, (int(mask.sum()), 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png, 64x64."""
    rng = np.random.default_rng(4)
    for split, n in per_class.items():
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in range(n):
                _picture(kind, rng).save(folder / f"{i:03d}.png")
    return root


def _png(kind: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    _picture(kind, np.random.default_rng(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_own_images_train_into_a_bundle_that_joins_a_running_server(tmp_path, cache_dir):
    data = _image_folder(tmp_path / "shapes", {"train": 60, "test": 12})
    repository = tmp_path / "models"
    repository.mkdir()
    (repository / "cifar10-default").symlink_to(ROOT / "models" / "cifar10-default")
    server = Server(repository, tmp_path / "server.log", INSTANAS_DEFAULT_MODEL="cifar10-default")
    try:
        # as the README says, with the folders and the virtual environment of this test
        done = subprocess.run(
            ["make", "-o", "install-train", "train", f"DATA={data}", "NAME=shapes", f"MODELS={repository}",
             f"RUNS={tmp_path / 'runs'}", f"VENV={BIN.parent}", "SET=data.val_images=30"],
            cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        manifest, _ = read_manifest(repository / "shapes")
        assert manifest.name == "shapes" and manifest.classes == sorted(CLASSES)
        assert manifest.preprocessing.input_size == 32  # the preset's; the 64x64 images are resized
        assert manifest.preprocessing.mean != (0.4914, 0.4822, 0.4465)  # measured on these images
        assert all(c.validation is not None and c.validation.images == 30 for c in manifest.controllers)

        # not served until the folder is read again: one reload, no restart
        assert httpx.post(server.url + "/classify", params={"model": "shapes"}, content=_png("disc", 1),
                          headers={"content-type": "image/png"}).status_code == 404
        reloaded = httpx.post(server.url + "/admin/reload", timeout=300)
        assert reloaded.status_code == 200, reloaded.text
        body = reloaded.json()
        assert body["model"]["name"] == body["previous"]["name"] == "cifar10-default"  # the default stays pinned
        assert {m["name"] for m in body["models"]} >= {"cifar10-default", "shapes", "shapes-mobilenet_v2"}
        for kind, seed in (("disc", 11), ("stripes", 12), ("square", 13)):
            answer = httpx.post(server.url + "/classify", params={"model": "shapes"}, content=_png(kind, seed),
                                headers={"content-type": "image/png"}, timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"]["name"] == "shapes" and answer.json()["prediction"]["label"] in CLASSES
        default = httpx.post(server.url + "/classify", content=_png("disc", 11), headers={"content-type": "image/png"},
                             timeout=30).json()
        assert default["model"]["name"] == "cifar10-default" and default["prediction"]["label"] in CIFAR10
    finally:
        server.stop()


def _readme_block(section: str, language: str = "sh") -> list[str]:
    """The command lines of the first `language` block under README.md's `## <section>`."""
    text = (ROOT / "README.md").read_text()
    part = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = part.split(f"```{language}\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_quick_start_and_classify_commands_as_written(tmp_path, test_jpegs):
    """`make serve` from the set-up section (its install step already done, another port), then the
    classify section's curl command as written, on a CIFAR-10 cat saved as cat.jpg, and the
    tritonclient example of docs/API.md on it and a ship saved as ship.png."""
    serve = _readme_block("Set up on a fresh machine")[0].split("#")[0].split()
    assert serve == ["make", "serve"]
    [classify] = _readme_block("Classify an image")
    assert classify.startswith("curl ") and "127.0.0.1:8000" in classify
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([*serve, "-o", "install-serve", f"PORT={port}", f"VENV={BIN.parent}"], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        (tmp_path / "cat.jpg").write_bytes(next(data for label, data in test_jpegs if label == "cat"))
        done = subprocess.run(classify.replace("127.0.0.1:8000", f"127.0.0.1:{port}"), shell=True, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["model"]["name"] == "cifar10-default" and answer["prediction"]["label"] in CIFAR10
        assert answer["operating_point"]["reason"] == "default" and answer["architecture"]["code"]
        # docs/API.md's tritonclient example, as written but for the port, on cat.jpg and ship.png
        api = (ROOT / "docs" / "API.md").read_text()
        snippet = api.split("works unmodified:\n\n```python\n", 1)[1].split("```", 1)[0]
        assert "127.0.0.1:8000" in snippet and '("cat.jpg", "ship.png")' in snippet
        ship = next(data for label, data in test_jpegs if label == "ship")
        Image.open(io.BytesIO(ship)).save(tmp_path / "ship.png")
        triton = subprocess.run([str(BIN / "python"), "-c", snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert triton.returncode == 0, triton.stderr
        assert "b'cat'" in triton.stdout and "b'ship'" in triton.stdout, triton.stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()
