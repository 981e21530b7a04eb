"""The live demo page (GET /), end to end in real headless Chromium against a real server.

Chromium and chromedriver are Debian's (scripts/test-setup.sh installs them); Selenium drives
them by path, so nothing is downloaded. A missing browser fails these tests, it does not skip
them.

The browser runs the controller itself (onnxruntime-web, WebAssembly) on the image as the page
prepares it; here its input pixels, probabilities and architecture are held against what the
server computes (Pillow decoding and resizing, onnxruntime). The default bundle's controller
puts some module within 0.01 of the threshold for nearly every image, which would excuse every
image from the architecture check; so the check also runs on a copy of the bundle whose
default controller has its logits scaled by SHARPNESS (decisive probabilities, most images
compared). A screenshot is kept at tests/artifacts/demo.png (a CI artifact).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from PIL import Image

from service import imaging
from service.bundle import load_bundle
from service.manifest import upgrade
from tests import hostile as h
from tests.conftest import ROOT, Server

pytestmark = pytest.mark.slow

DEFAULT_BUNDLE = ROOT / "models" / "cifar10-default"
STATIC = ROOT / "service" / "static"
VENDOR = STATIC / "vendor" / "onnxruntime-web"
ARTIFACTS = ROOT / "tests" / "artifacts"
NEAR = 0.01  # a probability this close to the threshold may flip on float differences
SHARPNESS = 50.0
WAIT_S = 60

# Measured (see the module docstring): identical pixels where no JPEG draft scaling applies;
# where it does (the browser averages s x s blocks of a full decode in its place) a few levels.
MAX_DRAFT_PIXEL_DIFF = 6
MAX_PROB_DIFF = 1e-5  # same pixels: onnxruntime-web against onnxruntime (measured 6e-8)
MAX_DRAFT_PROB_DIFF = 1e-3  # measured 9e-5 on the default bundle


# ---------- the browser ----------

def _find(*names: str) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = _find("chromium", "chromium-browser")
    driver_path = _find("chromedriver")
    if not chromium or not driver_path:
        pytest.fail("headless Chromium and chromedriver are needed (Debian packages chromium, chromium-driver): "
                    "run scripts/test-setup.sh as root")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService
    except ImportError:
        pytest.fail("selenium is needed: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1360,1600",
                "--force-device-scale-factor=1", "--hide-scrollbars", "--no-first-run", "--disable-extensions",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(service=DriverService(driver_path, log_output=str(log)), options=options)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, what: str, timeout: float = WAIT_S):
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.time() + timeout
    while True:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        if time.time() > deadline:
            state = driver.execute_script("return window.instanasDemo && {ready: instanasDemo.ready, "
                                          "error: instanasDemo.error, ortError: instanasDemo.ortError, "
                                          "status: document.getElementById('status').textContent}")
            pytest.fail(f"timed out waiting for {what}; page state {state}")
        time.sleep(0.1)


def open_demo(driver, server: Server) -> None:
    driver.get(server.url + "/")
    wait_for(driver, "window.instanasDemo && (instanasDemo.ready || instanasDemo.error)", "the page to start")
    state = driver.execute_script("return {error: instanasDemo.error, ortError: instanasDemo.ortError}")
    assert state == {"error": None, "ortError": None}, state


def upload(driver, path: Path) -> dict:
    """Give the page a file through its file input; the page's summary of that image."""
    from selenium.webdriver.common.by import By

    before = driver.execute_script("return instanasDemo.results.length")
    driver.find_element(By.ID, "file").send_keys(str(path))
    wait_for(driver, f"instanasDemo.results.length > {before}", f"the result for {path.name}")
    return driver.execute_script(f"return instanasDemo.results[{before}]")


def page_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def save_screenshot(driver, name: str) -> Path:
    """The whole page (beyond the window), into tests/artifacts/ (which ignores itself in git)."""
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 6000), "scale": 1}})
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


# ---------- servers and images ----------

@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    srv = Server(DEFAULT_BUNDLE, tmp_path_factory.mktemp("demo-server") / "server.log")
    yield srv
    srv.stop()


def sharpened_bundle(src: Path, dst: Path, factor: float) -> Path:
    """A copy of `src` with one more operating point, "sharp": the default controller with its
    logits multiplied by `factor` before the sigmoid, as the bundle's default."""
    shutil.copytree(src, dst)
    manifest = upgrade(json.loads((dst / "manifest.json").read_text()))
    base = next((c for c in manifest["controllers"] if c["name"] == manifest["default_controller"]),
                manifest["controllers"][0])  # the default point may be a cascade
    model = onnx.load(dst / base["file"])
    sigmoids = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    assert len(sigmoids) == 1, "the controller graph should end in one Sigmoid"
    [sigmoid] = sigmoids
    model.graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "demo_test_sharpness"))
    scale = helper.make_node("Mul", [sigmoid.input[0], "demo_test_sharpness"], ["demo_test_sharpened"])
    sigmoid.input[0] = "demo_test_sharpened"
    model.graph.node.insert(list(model.graph.node).index(sigmoid), scale)
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    (dst / "controller-demo-sharp.onnx").write_bytes(data)
    sharp = {**base, "name": "sharp", "file": "controller-demo-sharp.onnx", "sha256": hashlib.sha256(data).hexdigest(),
             "description": f"test only: {base['name']}'s logits x {factor}", "evaluation": None}
    manifest["controllers"] = [sharp, *manifest["controllers"]]
    manifest["default_controller"] = "sharp"
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


@pytest.fixture(scope="module")
def sharp_bundle(tmp_path_factory) -> Path:
    return sharpened_bundle(DEFAULT_BUNDLE, tmp_path_factory.mktemp("sharp") / "bundle", SHARPNESS)


@pytest.fixture(scope="module")
def sharp_server(sharp_bundle, tmp_path_factory):
    srv = Server(sharp_bundle, tmp_path_factory.mktemp("sharp-server") / "server.log")
    yield srv
    srv.stop()


def static_bundle(src: Path, dst: Path) -> Path:
    """A copy of `src` as a static bundle: MobileNetV2 (module 0 in every cell), no controller."""
    shutil.copytree(src, dst)
    manifest = upgrade(json.loads((dst / "manifest.json").read_text()))
    for point in manifest["controllers"]:
        (dst / point["file"]).unlink()
    manifest.update(controllers=[], cascades=[], networks=[], default_controller=None, evaluation=None,
                    fixed_architecture="1" * len(manifest["search_space"]["cells"]))
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


@pytest.fixture(scope="module")
def demo_images(test_jpegs, tmp_path_factory) -> list[Path]:
    """The 20 CIFAR-10 test JPEGs of conftest, then one upscaled to 97x61 (resized, not drafted)
    and larger ones that the server decodes at 1/2 and 1/8 scale (JPEG draft mode)."""
    folder = tmp_path_factory.mktemp("demo-images")
    paths = []
    for i, (label, data) in enumerate(test_jpegs):
        path = folder / f"{label}-{i:02d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    picture = Image.open(io.BytesIO(test_jpegs[6][1])).convert("RGB")
    for width, height in ((97, 61), (150, 100), (300, 260)):
        path = folder / f"{test_jpegs[6][0]}-{width}x{height}.jpg"
        picture.resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


# ---------- without a browser: the files and endpoints the page uses ----------

def test_vendored_onnxruntime_web_matches_its_checksums():
    script = (ROOT / "scripts" / "vendor-onnxruntime-web.sh").read_text()
    version = re.search(r"^VERSION=(\S+)$", script, re.M).group(1)
    lines = (VENDOR / "SHA256SUMS").read_text().splitlines()
    assert lines[0] == f"# onnxruntime-web {version}"
    sums = dict(reversed(line.split("  ", 1)) for line in lines if line and not line.startswith("#"))
    assert set(sums) == {"ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"}
    for name, digest in sums.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    assert sum((VENDOR / name).stat().st_size for name in sums) < 15_000_000
    index = (STATIC / "index.html").read_text()
    assert "/static/vendor/onnxruntime-web/ort.wasm.min.js" in index


def test_demo_endpoints(default_server):
    url = default_server.url
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for src in re.findall(r'src="(/static/[^"]+)"', page.text) + re.findall(r'href="(/static/[^"]+)"', page.text):
        assert httpx.get(url + src).status_code == 200, src
    wasm = httpx.get(url + "/static/vendor/onnxruntime-web/ort-wasm-simd-threaded.wasm")
    assert wasm.headers["content-type"] == "application/wasm"
    again = httpx.get(url + "/static/demo.js", headers={"if-none-match": httpx.get(url + "/static/demo.js").headers["etag"]})
    assert again.status_code == 304
    for outside in ("/static/../routes/demo.py", "/static/%2e%2e/app.py", "/static/nope.js"):
        assert httpx.get(url + outside).status_code == 404, outside

    manifest = httpx.get(url + "/model").json()
    for point in manifest["controllers"]:
        graph = httpx.get(f"{url}/model/controllers/{point['name']}.onnx")
        assert graph.status_code == 200
        assert hashlib.sha256(graph.content).hexdigest() == point["sha256"]
        assert graph.content == (DEFAULT_BUNDLE / point["file"]).read_bytes()
        assert httpx.get(f"{url}/model/controllers/{point['name']}.onnx",
                         headers={"if-none-match": graph.headers["etag"]}).status_code == 304
    missing = httpx.get(url + "/model/controllers/nope.onnx")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_operating_point"
    assert httpx.get(url + "/model/controllers/manifest.json").status_code == 404

    samples = httpx.get(url + "/demo/samples").json()["samples"]
    assert len(samples) >= 10 and all(s["label"] in manifest["classes"] for s in samples)

    gallery = httpx.get(url + "/demo/gallery").json()
    assert gallery["operating_point"] == manifest["default_controller"]
    assert gallery["images"] == len(samples) == sum(len(g["images"]) for g in gallery["groups"])
    assert gallery["architectures"] == len(gallery["groups"]) == len({(g["code"], g["network"]) for g in gallery["groups"]})
    latencies = [g["estimated_latency_ms"] for g in gallery["groups"]]
    assert latencies == sorted(latencies, reverse=True)
    # The gallery's grouping is what /classify answers for the same images.
    for group in gallery["groups"][:3]:
        image = group["images"][0]
        answer = httpx.post(url + "/classify", content=httpx.get(url + image["url"]).content,
                            headers={"content-type": "image/jpeg"}).json()
        assert (answer["architecture"]["code"], answer["architecture"]["network"]) == (group["code"], group["network"])
        assert answer["prediction"]["label"] == image["prediction"]
        first = answer["cascade"]["stages"][0]["confidence"] if answer["cascade"] else answer["prediction"]["probability"]
        assert image["confidence"] == pytest.approx(first, abs=1e-4)  # how sure the first look was
    for group in gallery["groups"]:  # each row from the least sure image to the surest
        sure = [image["confidence"] for image in group["images"]]
        assert sure == sorted(sure)
    assert httpx.get(url + "/demo/gallery", params={"operating_point": "nope"}).status_code == 422


# ---------- in the browser ----------

def test_resize_matches_pillow_bilinear(browser, default_server):
    """The page's own resize (preprocess.js) gives Pillow's BILINEAR result to the byte."""
    open_demo(browser, default_server)
    rng = np.random.default_rng(0)
    cases = [((97, 61), (32, 32)), ((61, 97), (32, 32)), ((33, 17), (32, 32)), ((300, 260), (32, 32)),
             ((5, 7), (32, 32)), ((32, 90), (32, 32)), ((90, 32), (32, 32)), ((50, 30), (20, 45)), ((30, 50), (45, 20))]
    cases += [(tuple(rng.integers(2, 200, 2)), tuple(rng.integers(2, 70, 2))) for _ in range(24)]
    for (w, h), (ow, oh) in cases:
        w, h, ow, oh = int(w), int(h), int(ow), int(oh)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((ow, oh), Image.Resampling.BILINEAR))
        got = browser.execute_script(
            "const [d, w, h, ow, oh] = arguments;"
            "return Array.from(InstanasPreprocess.resizeRGB(Uint8ClampedArray.from(d), w, h, ow, oh));",
            pixels.reshape(-1).tolist(), w, h, ow, oh)
        assert np.array_equal(np.array(got, np.uint8).reshape(oh, ow, 3), expected), f"{w}x{h} -> {ow}x{oh}"


PREPARE = """
const [data, pre, done] = arguments;
const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
InstanasPreprocess.prepare(new Blob([bytes]), pre).then(
  r => done({pixels: Array.from(r.pixels), width: r.width, height: r.height, draft: r.draft,
             orientation: r.orientation}),
  e => done({error: String(e)}));
"""


def test_exif_orientation_is_applied_as_the_server_applies_it(browser, default_server, test_jpegs):
    """Every orientation in every format both the browser and the server decode that carries EXIF
    (Chromium turns a JPEG and a PNG whose eXIf comes first, not a PNG whose eXIf follows the pixels,
    nor a WebP): the page's model input is the server's, to the byte where no JPEG draft applies."""
    open_demo(browser, default_server)
    pre = httpx.get(default_server.url + "/model").json()["preprocessing"]
    size = pre["input_size"]
    picture = Image.open(io.BytesIO(test_jpegs[3][1])).convert("RGB")
    for width, height in ((45, 37), (150, 100)):  # resized only; a JPEG at 1/2 (draft)
        upright = picture.resize((width, height), Image.Resampling.BICUBIC)
        for fmt in ("JPEG", "PNG", "PNG after pixels", "WEBP"):
            for orientation in range(1, 9):
                data = h.rotated_by_exif(fmt, orientation, upright)
                expected = imaging.to_pixels(imaging.decode(data, target_size=size), size)
                got = browser.execute_async_script(PREPARE, base64.b64encode(data).decode(), pre)
                case = f"{fmt} {width}x{height} orientation {orientation}"
                assert "error" not in got, (case, got)
                assert (got["width"], got["height"], got["orientation"]) == (width, height, orientation), case
                diff = int(np.abs(np.array(got["pixels"]).reshape(expected.shape) - expected.astype(int)).max())
                assert diff <= (0 if got["draft"] == 1 else MAX_DRAFT_PIXEL_DIFF), (case, diff)


def test_upload_of_a_webp_turned_by_exif(browser, default_server, test_jpegs, tmp_path):
    """Through the page: the file goes to the server as it is, and both sides classify it upright."""
    upright = Image.open(io.BytesIO(test_jpegs[3][1])).convert("RGB").resize((45, 37), Image.Resampling.BICUBIC)
    path = tmp_path / "turned.webp"
    path.write_bytes(h.rotated_by_exif("WEBP", 6, upright))
    open_demo(browser, default_server)
    result = upload(browser, path)
    assert result["server_error"] is None and result["local_error"] is None, result
    answer = httpx.post(default_server.url + "/classify", content=h.encode(upright, "PNG"),
                        headers={"content-type": "image/png"}).json()
    assert result["label"] == answer["prediction"]["label"] and result["server_code"] == answer["architecture"]["code"]
    pre = load_bundle(DEFAULT_BUNDLE).manifest.preprocessing
    pixels = imaging.to_pixels(upright, pre.input_size)
    assert np.array_equal(np.array(result["pixels"], np.uint8).reshape(pixels.shape), pixels)
    assert (result["width"], result["height"]) == (45, 37)


def test_upload_shows_label_architecture_and_previous(browser, default_server, demo_images):
    from selenium.webdriver.common.by import By

    open_demo(browser, default_server)
    manifest = httpx.get(default_server.url + "/model").json()
    space = manifest["search_space"]
    cells, modules = len(space["cells"]), len(space["cells"][0]["modules"])
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#operating-point option")]
    assert options == [c["name"] for c in manifest["controllers"]] + [c["name"] for c in manifest["cascades"]]
    cascade = manifest["default_controller"] in [c["name"] for c in manifest["cascades"]]

    first, second = demo_images[6], demo_images[20]  # a CIFAR-10 cat, then the same cat at 97x61
    answers = []
    for path in (first, second):
        result = upload(browser, path)
        answer = httpx.post(default_server.url + "/classify", content=path.read_bytes(),
                            headers={"content-type": "image/jpeg"}).json()
        answers.append(answer)
        assert result["server_error"] is None and result["local_error"] is None, result
        assert result["label"] == answer["prediction"]["label"]
        assert result["server_code"] == answer["architecture"]["code"]
        current = browser.find_element(By.ID, "current")
        assert current.find_element(By.CSS_SELECTOR, "[data-testid=label]").text == answer["prediction"]["label"]
        assert current.find_element(By.CSS_SELECTOR, "[data-testid=code]").text == answer["architecture"]["code"]
        squares = current.find_elements(By.CSS_SELECTOR, ".arch .grid .sq")
        assert len(squares) == cells * modules
        ran = [s for s in squares if "on" in s.get_attribute("class").split()]
        assert len(ran) == answer["architecture"]["modules_executed"]
        empty = sum(1 for c in answer["architecture"]["cells"] if not c["modules"])
        assert len(current.find_elements(By.CSS_SELECTOR, ".arch .grid .sq.skip")) == empty * modules
        if cascade:  # no controller in the browser; every stage that ran is drawn
            stages = current.find_elements(By.CSS_SELECTOR, "[data-testid=stages] .stage")
            assert len(stages) == len(answer["cascade"]["stages"]) and result["local_code"] is None
        else:
            badge = current.find_element(By.CSS_SELECTOR, "[data-testid=badge]").text.lower()
            assert badge == ("agree" if result["agree"] else "differ")
        assert f"{answer['architecture']['mflops']:.2f}" in current.text
        assert f"{answer['architecture']['estimated_latency_ms']:.3f} ms" in current.text

    previous = browser.find_element(By.ID, "previous")
    assert previous.find_element(By.CSS_SELECTOR, "[data-testid=code]").text == answers[0]["architecture"]["code"]
    assert "vs previous" in browser.find_element(By.ID, "current").text

    # A few more, for the chart; then the gallery, one row per architecture.
    for path in demo_images[:4]:
        upload(browser, path)
    drawn = browser.execute_script(
        "const c = document.getElementById('chart'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n;")
    assert drawn > 2000, "the latency chart is (nearly) empty"
    gallery = httpx.get(default_server.url + "/demo/gallery").json()
    wait_for(browser, f"document.querySelectorAll('#gallery .row').length === {gallery['architectures']}", "the gallery")
    rows = browser.find_elements(By.CSS_SELECTOR, "#gallery .row")
    assert [r.get_attribute("data-code") for r in rows] == [g["code"] for g in gallery["groups"]]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gallery .thumb")) == gallery["images"]
    assert not [e for e in page_errors(browser) if "favicon" not in e]
    save_screenshot(browser, "demo.png")


def test_operating_point_selector_passes_operating_point(browser, sharp_server, demo_images):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_demo(browser, sharp_server)
    names = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#operating-point option")]
    assert names[0] == "sharp" and len(names) >= 2
    other = names[1]
    assert upload(browser, demo_images[0])["server_point"] == "sharp"
    Select(browser.find_element(By.ID, "operating-point")).select_by_value(other)
    wait_for(browser, f"document.getElementById('gallery-info').textContent.includes('operating point {other}')",
             "the gallery of the other point")
    result = upload(browser, demo_images[0])
    assert result["point"] == result["server_point"] == other
    assert result["local_code"] == result["server_code"] or result["margin"] < NEAR


@pytest.mark.parametrize("which", ["default", "sharp"])
def test_browser_controller_agrees_with_server(which, browser, request, demo_images, sharp_bundle):
    """>= 20 JPEGs (CIFAR-10, one 97x61, two decoded by the server in draft mode): the browser's
    input pixels, probabilities and architecture against the server's."""
    server = request.getfixturevalue(f"{which}_server")
    bundle = load_bundle(DEFAULT_BUNDLE if which == "default" else sharp_bundle)
    manifest = bundle.manifest
    point = manifest.point()
    if point not in manifest.controllers:  # a cascade runs no controller: compare the first controller's
        point = manifest.controllers[0]
    pre = manifest.preprocessing
    gain = 1.0 if which == "default" else SHARPNESS  # the sharpened sigmoid's slope multiplies differences
    session = bundle.controllers[point.name]
    open_demo(browser, server)
    if point.name != manifest.default_controller:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element(By.ID, "operating-point")).select_by_value(point.name)
        wait_for(browser, f"document.getElementById('gallery-info').textContent.includes('operating point {point.name}')",
                 f"the gallery of point {point.name}")
    rows, compared, agreed = [], 0, 0
    for path in demo_images:
        result = upload(browser, path)
        assert result["server_error"] is None and result["local_error"] is None, result
        assert result["point"] == result["server_point"] == point.name
        image = imaging.decode(path.read_bytes(), target_size=pre.input_size)
        pixels = imaging.to_pixels(image, pre.input_size)
        native = session.run(None, {session.get_inputs()[0].name: imaging.to_input(pixels, pre)[None]})[0].reshape(-1)
        browser_pixels = np.array(result["pixels"], np.uint8).reshape(pixels.shape)
        probabilities = np.array(result["probabilities"], np.float64)
        pixel_diff = int(np.abs(browser_pixels.astype(int) - pixels).max())
        prob_diff = float(np.abs(probabilities - native).max())
        near = result["margin"] < NEAR
        if not near:
            compared += 1
            agreed += result["local_code"] == result["server_code"]
        rows.append({"image": path.name, "size": f"{result['width']}x{result['height']}", "draft": result["draft"],
                     "max_pixel_diff": pixel_diff, "max_probability_diff": prob_diff, "margin": result["margin"],
                     "agree": result["agree"], "near_threshold": near})
        if result["draft"] == 1:
            assert pixel_diff == 0, f"{path.name}: the browser's input differs from Pillow's"
            assert prob_diff <= MAX_PROB_DIFF * gain, f"{path.name}: probabilities differ by {prob_diff}"
        else:
            assert pixel_diff <= MAX_DRAFT_PIXEL_DIFF, f"{path.name}: draft-mode pixels differ by {pixel_diff}"
            assert prob_diff <= MAX_DRAFT_PROB_DIFF * gain, f"{path.name}: probabilities differ by {prob_diff}"
        if not near:
            assert result["local_code"] == result["server_code"], (
                f"{path.name}: browser {result['local_code']}, server {result['server_code']} (margin {result['margin']})")
    assert len(rows) >= 20 and any(r["size"] != "32x32" and r["draft"] == 1 for r in rows)
    report = {"bundle": which, "operating_point": point.name, "images": len(rows),
              "agree": sum(bool(r["agree"]) for r in rows), "compared": compared, "agreed_when_compared": agreed,
              "near_threshold": len(rows) - compared,
              "pixel_exact": sum(r["max_pixel_diff"] == 0 for r in rows),
              "max_probability_diff": max(r["max_probability_diff"] for r in rows), "rows": rows}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / ".gitignore").write_text("*\n")
    (ARTIFACTS / f"demo-agreement-{which}.json").write_text(json.dumps(report, indent=2))
    print(f"{which}: {report['agree']}/{len(rows)} architectures agree; {compared} compared (no probability within "
          f"{NEAR} of the threshold), {agreed} of them agree; {report['pixel_exact']} inputs pixel-exact; "
          f"max probability difference {report['max_probability_diff']:.2e}")
    if which == "sharp":
        assert compared >= len(rows) // 2, f"only {compared} of {len(rows)} images were far enough from the threshold"


def test_static_bundle_and_gallery_folder(browser, demo_images, tmp_path):
    """A static bundle (no controller: nothing runs in the browser) with the gallery read from
    INSTANAS_DEMO_GALLERY."""
    folder = tmp_path / "gallery"
    (folder / "cat").mkdir(parents=True)
    for path in demo_images[:5]:
        shutil.copy(path, folder / "cat" / path.name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    bundle = static_bundle(DEFAULT_BUNDLE, tmp_path / "static")
    server = Server(bundle, tmp_path / "server.log", INSTANAS_DEMO_GALLERY=str(folder), INSTANAS_DEMO_GALLERY_LIMIT="5")
    try:
        gallery = httpx.get(server.url + "/demo/gallery").json()
        assert gallery["operating_point"] is None and gallery["architectures"] == 1
        assert gallery["images"] == 4 and [s["name"] for s in gallery["skipped"]] == ["broken.jpg"]
        [group] = gallery["groups"]
        assert group["code"] == "1" * 17 and all(image["label"] == "cat" for image in group["images"])
        served = httpx.get(server.url + group["images"][0]["url"])
        assert served.status_code == 200 and served.content == (folder / group["images"][0]["name"]).read_bytes()
        assert httpx.get(server.url + "/demo/gallery/images/99").status_code == 404
        assert httpx.get(server.url + "/model/controllers/default.onnx").status_code == 404

        open_demo(browser, server)
        result = upload(browser, demo_images[0])
        assert result["server_code"] == "1" * 17 and result["local_code"] is None
        assert result["server_error"] is None and result["local_error"] is None
        wait_for(browser, "document.querySelectorAll('#gallery .thumb').length === 4", "the folder's gallery")
        assert not [e for e in page_errors(browser) if "favicon" not in e]
    finally:
        server.stop()


def test_a_cascade_point_draws_its_stages(browser, demo_images, tmp_path):
    """A bundle whose default point is a cascade: the page lists it with the controller, runs no
    controller in the browser for it, draws every stage that ran at its resolution, and groups the
    gallery by the network that answered."""
    from tests.helpers import export_cascade_bundle

    bundle = tmp_path / "cascade"
    export_cascade_bundle(bundle)
    server = Server(bundle, tmp_path / "server.log")
    try:
        open_demo(browser, server)
        options = browser.execute_script(
            "return Array.from(document.getElementById('operating-point').options).map((o) => o.value)")
        assert options == ["A", "fast"]
        assert "a cascade: mobilenet_v2@16" in browser.execute_script(
            "return document.querySelector('[data-testid=point-rule]').textContent")
        seen = set()
        for path in demo_images[:12]:
            result = upload(browser, path)
            assert result["server_error"] is None and result["local_error"] is None and result["local_code"] is None
            assert result["server_point"] == "fast" and result["stages"] in ([16], [16, 32])
            assert result["resolution"] == result["stages"][-1]
            drawn = browser.execute_script(
                "return Array.from(document.querySelectorAll('#current [data-testid=stages] .stage'))"
                ".map((s) => [Number(s.dataset.resolution), s.classList.contains('answered')])")
            assert drawn == [[r, i == len(result["stages"]) - 1] for i, r in enumerate(result["stages"])]
            seen.add(len(result["stages"]))
        assert seen == {1, 2}, "these images must both stop at 16x16 and escalate"
        gallery = httpx.get(server.url + "/demo/gallery").json()
        assert gallery["operating_point"] == "fast"
        assert {(g["network"], g["resolution"], g["stages"]) for g in gallery["groups"]} <= {
            ("mobilenet_v2@16", 16, 1), ("mobilenet_v2", 32, 2)}
        assert not [e for e in page_errors(browser) if "favicon" not in e]
    finally:
        server.stop()


def test_behind_an_api_token_the_page_asks_for_it_and_keeps_it_for_the_tab(browser, demo_images, tmp_path):
    """INSTANAS_API_TOKEN set: the manifest and controllers need the token, so the page asks for it;
    a wrong one is refused and asked again; the right one starts the page, the browser's controller
    included; and a reload of the tab does not ask again."""
    from selenium.webdriver.common.by import By

    server = Server(DEFAULT_BUNDLE, tmp_path / "server.log", INSTANAS_API_TOKEN="s3cret-demo-token")
    status = "document.getElementById('status').textContent"

    def give(token: str) -> None:
        wait_for(browser, "document.getElementById('token')", "the token field")
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()

    try:
        assert httpx.get(server.url + "/model").status_code == 401
        browser.get(server.url + "/")
        wait_for(browser, "window.instanasDemo && instanasDemo.needsToken", "the token prompt")
        assert browser.execute_script("return instanasDemo.ready") is False
        assert "needs its API token" in browser.execute_script(f"return {status}")
        give("not-the-token")
        wait_for(browser, f"{status}.includes('did not accept')", "the wrong token refused")
        give("s3cret-demo-token")
        wait_for(browser, "instanasDemo.ready || instanasDemo.error", "the page to start")
        assert browser.execute_script("return {error: instanasDemo.error, ortError: instanasDemo.ortError, "
                                      "asking: instanasDemo.needsToken, form: !!document.getElementById('token-form')}") \
            == {"error": None, "ortError": None, "asking": False, "form": False}
        browser.execute_script("instanasDemo.setOperatingPoint('A')")  # a controller point: its graph needs the token
        result = upload(browser, demo_images[0])
        assert result["server_error"] is None and result["local_error"] is None and result["local_code"]
        browser.get(server.url + "/")  # the same tab: the token is kept
        open_demo(browser, server)
        assert browser.execute_script("return instanasDemo.needsToken") is False
        assert not [e for e in page_errors(browser) if "favicon" not in e and "401" not in e]
    finally:
        server.stop()
