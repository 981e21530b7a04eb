"""More from /classify, through a real server: several images a request (multipart `file` parts, JSON
base64) as one batch, every image mode and container the decoder handles in each form, the limit on
images, and a specific 4xx for each input that cannot be classified."""

from __future__ import annotations

import base64
import io

import httpx
import jsonschema
import numpy as np
import pytest
from PIL import Image

from service.schemas import ClassifyResponse, ErrorResponse
from service.settings import Settings
from tests import hostile as h
from tests.conftest import ROOT, Server
from tests.helpers import export_test_bundle
from training.searchspace import build_tiny_space

LIMIT = 4  # INSTANAS_MAX_IMAGES_PER_REQUEST of the server below
MAX_PIXELS = 250_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A bundle whose controller picks different architectures for different images."""
    bundle = tmp_path_factory.mktemp("inputs-bundle")
    export_test_bundle(bundle, build_tiny_space(), seed=3)
    srv = Server(bundle, bundle.parent / "inputs-server.log", INSTANAS_MAX_IMAGES_PER_REQUEST=str(LIMIT),
                 INSTANAS_MAX_PIXELS=str(MAX_PIXELS))
    yield srv
    srv.stop()


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


@pytest.fixture(scope="module")
def pictures(test_jpegs) -> dict[str, bytes]:
    """Real CIFAR-10 pictures re-encoded in every mode and container the service decodes."""
    rgb = [Image.open(io.BytesIO(data)).convert("RGB").resize((48, 40)) for _, data in test_jpegs[::2]]
    rgba = rgb[2].convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    grey16 = Image.fromarray((np.asarray(rgb[4].convert("L"), np.uint16) * 257).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown after a 90 degree clockwise turn
    frames = [rgb[7], rgb[8], rgb[9]]
    out = {
        "jpeg": test_jpegs[0][1],
        "grey jpeg": _encode(rgb[1].convert("L"), "JPEG"),
        "palette png": _encode(rgb[3].convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG"),
        "rgba png": _encode(rgba, "PNG"),
        "cmyk jpeg": _encode(rgb[5].convert("CMYK"), "JPEG"),
        "16-bit png": _encode(grey16, "PNG"),
        "exif-rotated jpeg": _encode(rgb[6].rotate(90, expand=True), "JPEG", exif=exif),
        "animated gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        "animated webp": _encode(frames[1], "WEBP", save_all=True, append_images=[frames[2], frames[0]], duration=100, lossless=True),
        "apng": _encode(frames[2], "PNG", save_all=True, append_images=frames[:2], duration=100),
        "tiff": _encode(rgb[0], "TIFF"),
        "bmp": _encode(rgb[1], "BMP"),
    }
    opened = {name: Image.open(io.BytesIO(data)) for name, data in out.items()}
    assert {name: opened[name].mode for name in ("grey jpeg", "palette png", "rgba png", "cmyk jpeg", "16-bit png")} \
        == {"grey jpeg": "L", "palette png": "P", "rgba png": "RGBA", "cmyk jpeg": "CMYK", "16-bit png": "I;16"}
    assert all(opened[name].n_frames == 3 for name in ("animated gif", "animated webp", "apng"))
    assert opened["exif-rotated jpeg"].getexif()[0x0112] == 6
    return out


def classify_raw(server, data: bytes, **params) -> dict:
    response = httpx.post(server.url + "/classify", content=data, params=params, timeout=30,
                          headers={"content-type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    return response.json()


def multipart(server, images: list[bytes], **params) -> httpx.Response:
    files = [("file", (f"image{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    return httpx.post(server.url + "/classify", files=files, params=params, timeout=30)


def as_json(server, body, **params) -> httpx.Response:
    return httpx.post(server.url + "/classify", json=body, params=params, timeout=30)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def same_answer(a: dict, b: dict) -> bool:
    return a["top_k"] == b["top_k"] and a["architecture"] == b["architecture"] and a["model"] == b["model"]


def test_the_limit_defaults_to_32():
    assert Settings().max_images_per_request == 32


@pytest.mark.parametrize("form", ["multipart", "json"])
def test_every_picture_kind_in_one_request_each_answered_as_alone(server, pictures, form):
    names = list(pictures)
    alone = {name: classify_raw(server, pictures[name], top_k=3) for name in names}
    for i in range(0, len(names), LIMIT):
        chunk = names[i:i + LIMIT]
        images = [pictures[name] for name in chunk]
        if form == "multipart":
            response = multipart(server, images, top_k=3)
        else:
            response = as_json(server, {"images": [b64(d) for d in images]}, top_k=3)
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == len(chunk)
        for name, result in zip(chunk, results):
            jsonschema.validate(result, ClassifyResponse.model_json_schema())
            assert same_answer(result, alone[name]), name
            # all of the request's images ran in one executor batch
            assert result["latency_ms"]["batch_size"] >= len(chunk)


def test_several_images_come_back_in_order(server, test_jpegs):
    images = [data for _, data in test_jpegs[:LIMIT]]
    alone = [classify_raw(server, data) for data in images]
    assert len({a["architecture"]["code"] for a in alone}) > 1  # so an order mix-up would show
    for reordered in (images, images[::-1]):
        results = multipart(server, reordered).json()["results"]
        expected = alone if reordered is images else alone[::-1]
        assert all(same_answer(r, e) for r, e in zip(results, expected))
        results = as_json(server, {"images": [b64(d) for d in reordered]}).json()["results"]
        assert all(same_answer(r, e) for r, e in zip(results, expected))


def test_one_image_keeps_todays_response(server, test_jpegs):
    data = test_jpegs[5][1]
    raw = classify_raw(server, data)
    for response in (multipart(server, [data]), as_json(server, {"image": b64(data)}),
                     as_json(server, {"images": [b64(data)]}),
                     as_json(server, {"image": "data:image/jpeg;base64," + b64(data)}),
                     as_json(server, {"image": base64.encodebytes(data).decode()})):  # MIME line breaks
        assert response.status_code == 200, response.text
        body = response.json()
        assert "results" not in body and set(body) == set(raw)
        jsonschema.validate(body, ClassifyResponse.model_json_schema())
        assert same_answer(body, raw)


def test_exif_orientation_is_applied(server, test_jpegs):
    upright = Image.open(io.BytesIO(test_jpegs[2][1])).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise
    stored = _encode(upright.rotate(90, expand=True), "PNG", exif=exif)  # lossless: the same pixels come back
    sideways = _encode(upright.rotate(90, expand=True), "PNG")
    answer = as_json(server, {"images": [b64(stored), b64(_encode(upright, "PNG")), b64(sideways)]}).json()["results"]
    assert same_answer(answer[0], answer[1])
    assert answer[0]["top_k"] != answer[2]["top_k"]  # the orientation made the difference


@pytest.fixture(scope="module")
def trained_server(tmp_path_factory):
    """The trained default bundle: the test bundle's random weights answer about 0.1 for every class,
    and a picture turned the wrong way moves its probabilities by 1e-6 at most, under any tolerance
    worth having; the trained one moves them by 0.1 to 1."""
    srv = Server(ROOT / "models" / "cifar10-default", tmp_path_factory.mktemp("trained") / "server.log")
    yield srv
    srv.stop()


def close_answers(a: dict, b: dict, tolerance: float = 1e-5) -> bool:
    """The same labels, in order, and probabilities within `tolerance`, from the same architecture."""
    return ([p["label"] for p in a["top_k"]] == [p["label"] for p in b["top_k"]]
            and max(abs(p["probability"] - q["probability"]) for p, q in zip(a["top_k"], b["top_k"])) <= tolerance
            and a["architecture"]["code"] == b["architecture"]["code"])


@pytest.mark.parametrize("fmt", ["PNG", "PNG after pixels", "WEBP", "TIFF"])
def test_a_picture_turned_by_its_exif_tag_is_classified_upright(trained_server, test_jpegs, fmt):
    """Each of the 8 orientations, in every lossless format carrying EXIF (a PNG's eXIf chunk ahead of
    the pixels or after them), sent alone: the upright picture's answer."""
    upright = Image.open(io.BytesIO(test_jpegs[2][1])).convert("RGB").resize((48, 40))
    expected = classify_raw(trained_server, _encode(upright, "PNG"), top_k=10)
    for orientation in range(1, 9):
        answer = classify_raw(trained_server, h.rotated_by_exif(fmt, orientation, upright), top_k=10)
        assert close_answers(answer, expected), (orientation, answer["top_k"][:3], expected["top_k"][:3])
        if orientation > 1:  # the check can tell: the picture as stored, without its tag, is answered otherwise
            stored = classify_raw(trained_server, _encode(h.as_stored(upright, orientation), "PNG"), top_k=10)
            assert not close_answers(stored, expected, tolerance=0.01), orientation


def assert_refused(response: httpx.Response, status: int, code: str, fragment: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    ErrorResponse.model_validate(body)
    assert body["error"]["code"] == code, body
    assert fragment in body["error"]["message"], body


def test_too_many_images_is_413(server, test_jpegs):
    images = [data for _, data in test_jpegs[:LIMIT + 1]]
    assert_refused(multipart(server, images), 413, "too_many_images", str(LIMIT))
    assert_refused(as_json(server, {"images": [b64(d) for d in images]}), 413, "too_many_images", str(LIMIT))
    assert multipart(server, images[:LIMIT]).status_code == 200


def test_one_bad_image_fails_the_request_and_names_it(server, test_jpegs, pictures):
    good = test_jpegs[0][1]
    assert_refused(multipart(server, [good, good[:300], good]), 400, "corrupt_image", "image 1")
    assert_refused(multipart(server, [good, good, b""]), 400, "empty_body", "image 2")
    assert_refused(as_json(server, {"images": [b64(good), b64(b"hello, world")]}), 400, "not_an_image", "image 1")
    assert_refused(as_json(server, {"images": [b64(good), "%%%%"]}), 400, "invalid_base64", "image 1")
    ppm = _encode(Image.open(io.BytesIO(good)), "PPM")
    assert_refused(as_json(server, {"images": [b64(good), b64(good), b64(ppm)]}), 415, "unsupported_image_format",
                   "image 2")
    big = _encode(Image.new("RGB", (600, 600)), "PNG")  # over INSTANAS_MAX_PIXELS
    assert_refused(multipart(server, [big, good]), 413, "image_too_large", "image 0")
    assert classify_raw(server, good)  # and the server still serves


UNSUPPORTED = {
    "invalid JSON": (b'{"images": [', 400, "invalid_json"),
    "JSON not UTF-8": (b'{"image": "\xff"}', 400, "invalid_json"),
    "no images": (b'{"pictures": []}', 400, "missing_image"),
    "empty images": (b'{"images": []}', 400, "missing_image"),
    "bad base64": (b'{"image": "not base64!"}', 400, "invalid_base64"),
    "JSON list": (b'["abc"]', 422, "invalid_request"),
    "images not a list": (b'{"images": "abc"}', 422, "invalid_request"),
    "image not a string": (b'{"image": 5}', 422, "invalid_request"),
    "an image not a string": (b'{"images": ["aGk=", {"b64": "aGk="}]}', 422, "invalid_request"),
    "image and images": (b'{"image": "aGk=", "images": ["aGk="]}', 422, "invalid_request"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_json_bodies_that_cannot_be_classified_get_their_own_4xx(server, case):
    body, status, code = UNSUPPORTED[case]
    response = httpx.post(server.url + "/classify", content=body, headers={"content-type": "application/json"})
    assert_refused(response, status, code)


def test_unsupported_files_get_their_own_4xx(server, test_jpegs):
    picture = Image.open(io.BytesIO(test_jpegs[0][1]))
    for data, status, code in [(_encode(picture, "PPM"), 415, "unsupported_image_format"),
                               (_encode(picture.resize((16, 16)), "ICO"), 415, "unsupported_image_format"),
                               (_encode(Image.new("RGB", (600, 600)), "PNG"), 413, "image_too_large"),
                               (test_jpegs[0][1][:300], 400, "corrupt_image"),
                               (b"plain text, not a picture", 400, "not_an_image")]:
        response = httpx.post(server.url + "/classify", files={"file": ("x", data)})
        assert_refused(response, status, code)
        assert_refused(as_json(server, {"image": b64(data)}), status, code)
    response = httpx.post(server.url + "/classify", files={"other": ("x", test_jpegs[0][1])})
    assert_refused(response, 400, "missing_file")
