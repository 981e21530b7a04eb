"""POST /classify's fast path (service/fast_path.py) answers exactly as the FastAPI route does.

The same requests go to the app as served and to the same app without the fast path (the route
alone): statuses, bodies (less their timings), headers and the metrics they move must agree, for
answers and for every kind of refusal; plainly valid queries must take the fast path, and the
others the route."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest

from service import fast_path
from service.app import create_app
from service.envelope import Envelope
from service.fast_path import parse_query
from service.metrics import sample
from service.routes import classify as classify_route
from service.settings import Settings
from tests.helpers import export_test_bundle
from training.searchspace import build_tiny_space


def test_plainly_valid_queries_are_parsed():
    default = {"model": None, "top_k": None, "operating_point": None, "max_latency_ms": None, "architecture": "auto"}
    assert parse_query(b"") == default
    assert parse_query(b"top_k=3&max_latency_ms=0.25&operating_point=B&model=m&architecture=mobilenet_v2") == {
        "model": "m", "top_k": 3, "operating_point": "B", "max_latency_ms": 0.25, "architecture": "mobilenet_v2"}
    assert parse_query(b"other=1&other=2&top_k=2")["top_k"] == 2  # undeclared parameters are ignored, as by the route
    assert parse_query(b"model=caf%C3%A9")["model"] == "café"  # percent-escapes read as UTF-8, as Starlette reads them
    assert parse_query(b"max_latency_ms=3")["max_latency_ms"] == 3.0


@pytest.mark.parametrize("query", [
    b"top_k=0", b"top_k=-1", b"top_k=1.0", b"top_k=+2", b"top_k=%202", b"top_k=1e1", b"top_k=99999999999",
    b"top_k=", b"top_k", b"top_k=2&top_k=3", b"max_latency_ms=0", b"max_latency_ms=-1", b"max_latency_ms=inf",
    b"max_latency_ms=nan", b"max_latency_ms=1e3", b"max_latency_ms=.5", b"model=", b"operating_point=",
    b"architecture=", b"model=a&model=b"])
def test_anything_else_is_left_to_the_route(query):
    assert parse_query(query) is None


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle whose controller picks per image."""
    path = tmp_path_factory.mktemp("fast-path-bundle")
    export_test_bundle(path, build_tiny_space(), seed=3)
    return path


@pytest.fixture
def apps(bundle):
    """(served app, the same app without the fast path); each runs once (its lifespan stops its models)."""
    settings = Settings(model=str(bundle), max_images_per_request=3)
    served, route_only = create_app(settings), create_app(settings)
    route_only.envelope["fast"] = False  # (the envelope is built at the app's first request)
    return served, route_only


def _comparable(response: httpx.Response):
    headers = {k: v for k, v in response.headers.items() if k not in ("x-request-id", "content-length")}  # timings vary
    body = response.json()

    def strip(answer):
        answer.pop("latency_ms", None)
        return answer

    if isinstance(body, dict) and "results" in body:
        body["results"] = [strip(a) for a in body["results"]]
    elif isinstance(body, dict):
        strip(body)
    return response.status_code, headers, body


def _requests(test_jpegs):
    jpeg, other = test_jpegs[0][1], test_jpegs[5][1]
    as_jpeg = {"content-type": "image/jpeg"}
    return [
        ("", jpeg, as_jpeg),
        ("?top_k=3", jpeg, as_jpeg),
        ("?top_k=10", other, as_jpeg),
        ("?operating_point=default", jpeg, as_jpeg),
        ("?max_latency_ms=1000", other, as_jpeg),  # 422: this bundle's points carry no measured latency
        ("?architecture=mobilenet_v2", jpeg, as_jpeg),
        ("?architecture=all&top_k=2", jpeg, as_jpeg),
        ("?unknown=1", jpeg, {"content-type": "image/jpeg; charset=binary"}),
        ("", jpeg, {"content-type": "application/octet-stream"}),
        ("", json.dumps({"images": [base64.b64encode(jpeg).decode(), base64.b64encode(other).decode()]}).encode(),
         {"content-type": "application/json"}),
        # refusals the fast path makes through the route's own checks
        ("?top_k=11", jpeg, as_jpeg),  # more than the classes
        ("?model=nope", jpeg, as_jpeg),
        ("?operating_point=Z", jpeg, as_jpeg),
        ("?architecture=zz", jpeg, as_jpeg),
        ("?architecture=all&operating_point=default", jpeg, as_jpeg),
        ("", jpeg, {"content-type": "text/plain"}),
        ("", jpeg, {}),
        ("", b"", as_jpeg),
        ("", b"not an image", as_jpeg),
        ("", json.dumps({"images": ["a"] * 4}).encode(), {"content-type": "application/json"}),
        # and those it leaves to the route
        ("?top_k=0", jpeg, as_jpeg),
        ("?top_k=x", jpeg, as_jpeg),
        ("?max_latency_ms=-1", jpeg, as_jpeg),
        ("?max_latency_ms=inf", jpeg, as_jpeg),
    ]


async def _send_all(app, requests):
    out = []
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for query, body, headers in requests:
                out.append(await client.post("/classify" + query, content=body, headers=headers))
            metrics = (await client.get("/metrics")).text
    return out, metrics


def test_the_fast_path_answers_as_the_route(apps, test_jpegs):
    served, route_only = apps
    requests = _requests(test_jpegs)
    fast, fast_metrics = asyncio.run(_send_all(served, requests))
    slow, slow_metrics = asyncio.run(_send_all(route_only, requests))
    statuses = [r.status_code for r in fast]
    assert statuses.count(200) == 9 and {400, 404, 413, 415, 422} <= set(statuses)
    for (query, _, headers), a, b in zip(requests, fast, slow):
        assert _comparable(a) == _comparable(b), (query, headers)
    # the metrics the requests moved agree too (requests by endpoint and status, refusals by reason, images)
    for name, labels in [("instanas_requests_total", {"endpoint": "/classify", "status": "200"}),
                         ("instanas_requests_total", {"endpoint": "/classify", "status": "422"}),
                         ("instanas_requests_total", {"endpoint": "/classify", "status": "415"}),
                         ("instanas_rejections_total", {"reason": "invalid_request"}),
                         ("instanas_rejections_total", {"reason": "unknown_operating_point"}),
                         ("instanas_rejections_total", {"reason": "unsupported_media_type"}),
                         ("instanas_rejections_total", {"reason": "unknown_model"}),
                         ("instanas_operating_point_total", {}),
                         ("instanas_module_executions_total", {})]:
        assert sample(fast_metrics, name, **labels) == sample(slow_metrics, name, **labels) > 0, (name, labels)


def test_plain_queries_take_the_fast_path_and_the_others_the_route(apps, test_jpegs, monkeypatch):
    served, _ = apps
    callers = []
    answer = classify_route.answer

    async def spy(*args, **kwargs):
        import inspect

        callers.append(inspect.stack()[1].function)
        return await answer(*args, **kwargs)

    monkeypatch.setattr(classify_route, "answer", spy)
    monkeypatch.setattr(fast_path.classify, "answer", spy)
    jpeg = test_jpegs[0][1]
    requests = [("?top_k=2", jpeg, {"content-type": "image/jpeg"}), ("?top_k=2&top_k=2", jpeg, {"content-type": "image/jpeg"})]
    responses, _ = asyncio.run(_send_all(served, requests))
    assert [r.status_code for r in responses] == [200, 200]
    assert callers == ["answer", "classify"]  # fast_path.answer, then the FastAPI route's handler


def test_an_error_escaping_either_path_answers_500_with_its_id_and_is_logged(apps, test_jpegs, monkeypatch, caplog):
    """The envelope is the app's outermost layer, outside the framework's error layer: an error
    escaping the fast path is answered and logged by the envelope, one escaping the route by the
    app's error handler, alike."""
    import logging

    from service import classification, logs

    def broken(*args, **kwargs):
        raise RuntimeError("kaput")

    monkeypatch.setattr(classification, "classify", broken)
    jpeg = test_jpegs[0][1]
    for app in apps:
        caplog.clear()

        async def send():
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
                async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                    return await client.post("/classify?top_k=2", content=jpeg,
                                             headers={"content-type": "image/jpeg", "x-request-id": "boom-2"})

        with caplog.at_level(logging.INFO):
            response = asyncio.run(send())
        assert isinstance(app.middleware_stack, Envelope)
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
        assert response.headers["x-request-id"] == "boom-2"
        [traceback] = [r for r in caplog.records if r.name == "instanas.service" and r.exc_info]  # logged once
        assert traceback.getMessage() == "unhandled error"
        [line] = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
        assert line.status == 500 and line.request_id == "boom-2"
