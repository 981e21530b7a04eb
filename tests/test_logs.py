"""Structured logs: one JSON access line per request from a real server process, request ids taken
or made and echoed on every response (errors included), the text format, the level and the switch."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service import logs
from service.app import create_app
from service.settings import Settings
from tests.conftest import Server
from tests.helpers import export_test_bundle
from training.searchspace import build_tiny_space

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("logs-bundle")
    _, _, manifest = export_test_bundle(out, build_tiny_space(), seed=3)
    return out, manifest


def records(log_path) -> list[dict]:
    """The log's JSON lines written so far, complete ones only (the server may be writing the next)."""
    text = log_path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line.strip()]


def access_lines(log_path, expected: int, timeout: float = 10) -> list[dict]:
    """The server's JSON access lines, once at least `expected` of them are written."""
    deadline = time.time() + timeout
    while True:
        lines = records(log_path)
        access = [line for line in lines if line["logger"] == logs.ACCESS_LOGGER]
        if len(access) >= expected or time.time() > deadline:
            return access
        time.sleep(0.1)


def test_request_ids_are_taken_when_usable_and_made_otherwise():
    assert logs.request_id_from(b"abc-123") == "abc-123"
    assert logs.request_id_from(b"with spaces and / punctuation!") == "with spaces and / punctuation!"
    assert logs.request_id_from(b"x" * 128) == "x" * 128
    for unusable in (None, b"", b"   ", b"x" * 129, b"tab\there", b"caf\xc3\xa9", b"nul\x00"):
        assert HEX_ID.match(logs.request_id_from(unusable)), unusable
    assert logs.request_id_from(None) != logs.request_id_from(None)


def test_made_request_ids_are_unique_across_forked_workers():
    ids = [logs.new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000 and all(HEX_ID.match(i) for i in ids)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # a worker forked from the supervisor: its own prefix, so no id repeats the parent's
        os.write(write, logs.new_request_id().encode())
        os._exit(0)
    os.waitpid(child, 0)
    theirs = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert HEX_ID.match(theirs) and theirs[:16] != logs.new_request_id()[:16]


def test_json_formatter_writes_one_object_a_record():
    record = logging.LogRecord("instanas.test", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    record.status = 418
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "hello world" and out["level"] == "WARNING" and out["logger"] == "instanas.test"
    assert out["status"] == 418 and "ValueError: boom" in out["exception"] and out["time"].endswith("+00:00")


def test_json_formatter_writes_what_orjson_refuses_and_any_object():
    record = logging.LogRecord("instanas.test", logging.INFO, __file__, 1, "caf\u00e9", (), None)
    record.big, record.path, record.nan = 2**70, Path("/x"), float("nan")
    out = json.loads(logs.JsonFormatter().format(record))  # an integer past 64 bits: the json module writes it
    assert out["big"] == 2**70 and out["path"] == "/x" and out["message"] == "caf\u00e9"
    del record.big
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line and json.loads(line)["nan"] is None  # orjson: NaN is null, valid JSON


@pytest.fixture
def only_our_handler():
    """configure()'s JSON handler, writing to a buffer; the root logger's handlers as they were, after."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers = []
    handler = logs.configure("json", "info")
    handler.setStream(io.StringIO())
    yield handler
    root.handlers, root.level = saved, level


def test_an_access_line_written_directly_is_the_line_the_logging_module_writes(only_our_handler):
    """With configure()'s handler the only one, AccessLog writes the JSON line itself; anything else
    that could see or change the line (a filter, another handler) sends it through the logging
    module, and the two lines carry the same fields in the same order."""
    scope = {"method": "POST", "path": "/classify", "query_string": b"top_k=2", "client": ("10.0.0.7", 5),
             logs.NOTES_KEY: {"architecture": ["a1b2"], "operating_point": "fast", "model": "m", "model_version": "3"}}
    access, stream = logs.AccessLog(), only_our_handler.stream
    seen = []

    def one_line() -> dict:
        start = stream.tell()
        access.write(scope, "f" * 32, 200, 1.23456)
        line = stream.getvalue()[start:]
        assert line.endswith("\n") and line.count("\n") == 1
        return json.loads(line)

    logging.getLogger().handlers = [only_our_handler]  # pytest adds its own for each test's call
    assert access._only_handler() is only_our_handler
    direct = one_line()
    access.log.addFilter(lambda record: seen.append(record) or True)
    try:
        assert access._only_handler() is None
        through_logging = one_line()
    finally:
        access.log.filters.clear()
    assert len(seen) == 1 and seen[0].status == 200  # the filter saw the record: the logging module wrote it
    assert abs(time.time() - datetime.fromisoformat(direct.pop("time")).timestamp()) < 60
    through_logging.pop("time")
    assert list(direct.items()) == list(through_logging.items())
    assert direct["message"] == ('10.0.0.7 "POST /classify?top_k=2" 200 1.2ms request_id=' + "f" * 32
                                 + " architecture=a1b2 operating_point=fast model=m model_version=3")
    assert direct["pid"] == os.getpid() and direct["duration_ms"] == 1.235 and direct["query"] == "top_k=2"

    other = logging.StreamHandler(io.StringIO())  # a handler of its own on a logger between
    logging.getLogger("instanas").addHandler(other)
    try:
        assert access._only_handler() is None
        one_line()
        assert " 200 1.2ms request_id=" in other.stream.getvalue()
    finally:
        logging.getLogger("instanas").removeHandler(other)
    with pytest.MonkeyPatch.context() as patch:  # what changes records: a factory, level names, no process ids
        for name, value in (("_logRecordFactory", lambda *a, **k: logging.LogRecord(*a, **k)),
                            ("logProcesses", False)):
            patch.setattr(logging, name, value)
            assert access._only_handler() is None, name
            patch.undo()
        logging.addLevelName(logging.INFO, "info")
        try:
            assert access._only_handler() is None
        finally:
            logging.addLevelName(logging.INFO, "INFO")
    assert access._only_handler() is only_our_handler
    handled = []  # a stream that fails: the line goes to the logging module, which reports it; the request goes on
    only_our_handler.stream = io.StringIO()
    only_our_handler.stream.close()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(only_our_handler, "handleError", handled.append)
        access.write(scope, "f" * 32, 200, 1.0)
    assert len(handled) == 1 and handled[0].status == 200
    logging.getLogger().handlers[0].setFormatter(logging.Formatter(logs.TEXT_FORMAT))
    assert access._only_handler() is None  # the text format: the logging module's


def test_a_real_server_writes_one_json_access_line_per_request(bundle, test_jpegs, tmp_path):
    path, manifest = bundle
    srv = Server(path, tmp_path / "server.log")
    try:
        jpeg = test_jpegs[0][1]
        before = len(access_lines(srv.log, 0))
        sent = []  # (request id or None, method, path, status, images)

        def call(method, url_path, rid=None, images=0, **kwargs):
            headers = kwargs.pop("headers", {})
            if rid is not None:
                headers["x-request-id"] = rid
            response = httpx.request(method, srv.url + url_path, headers=headers, timeout=30, **kwargs)
            echoed = response.headers["x-request-id"]
            given = rid.decode("latin-1") if isinstance(rid, bytes) else rid
            if given is not None and logs.request_id_from(given.encode("latin-1")) == given:
                assert echoed == given
            else:
                assert HEX_ID.match(echoed), echoed
            sent.append((echoed, method, response.request.url.path, response.request.url.query.decode() or None,
                         response.status_code, images))
            return response

        call("GET", "/healthz/ready", rid="ready-probe-1")
        assert call("POST", "/classify", rid="one image", images=1, content=jpeg,
                    headers={"content-type": "image/jpeg"}).status_code == 200
        assert call("POST", "/classify?top_k=2", images=3,
                    json={"images": [base64.b64encode(d).decode() for _, d in test_jpegs[:3]]}).status_code == 200
        assert call("POST", "/classify", rid="x" * 129, content=b"", headers={"content-type": "image/jpeg"}
                    ).status_code == 400
        assert call("POST", "/classify", rid=b"caf\xe9", content=jpeg, images=1, headers={"content-type": "image/jpeg"},
                    params={"architecture": "mobilenet_v2"}).status_code == 200
        assert call("GET", "/nope", rid="missing").status_code == 404
        assert call("POST", "/classify", rid="refused", content=jpeg, headers={"content-type": "text/plain"}
                    ).status_code == 415
        v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                          "data": [base64.b64encode(d).decode() for _, d in test_jpegs[:2]]}]}
        assert call("POST", f"/v2/models/{manifest.name}/infer", rid="v2-batch", images=2, json=v2).status_code == 200
        assert call("POST", "/v2/models/other/infer", rid="v2-unknown", json=v2).status_code == 404

        lines = access_lines(srv.log, before + len(sent))[before:]
        by_id = {}
        for line in lines:
            by_id.setdefault(line["request_id"], []).append(line)
        for rid, method, url_path, query, status, images in sent:
            [line] = by_id[rid]  # exactly one line per request
            assert (line["method"], line["path"], line["query"], line["status"]) == (method, url_path, query, status), line
            assert line["duration_ms"] > 0 and line["level"] == "INFO" and line["client"] == "127.0.0.1"
            assert line["model_version"] == manifest.version
            if images:
                assert len(line["architecture"]) == images and all(re.match(r"^[0-9a-v]+$", c) for c in line["architecture"])
            else:
                assert line["architecture"] is None
        assert by_id[sent[1][0]][0]["operating_point"] == manifest.default_controller
        assert by_id[sent[4][0]][0]["operating_point"] is None  # architecture given: no controller ran
        assert by_id[sent[4][0]][0]["architecture"] == ["1111"]
        # every line of the log is JSON, and uvicorn's own access log is gone
        every = records(srv.log)
        assert not [line for line in every if line["logger"] == "uvicorn.access"]
        assert any(line["logger"] == "uvicorn.error" for line in every)  # uvicorn's other logs: JSON too
    finally:
        srv.stop()


def test_text_format_level_and_switch(bundle, tmp_path):
    path, _ = bundle
    text = Server(path, tmp_path / "text.log", INSTANAS_LOG_FORMAT="text")
    try:
        response = httpx.get(text.url + "/healthz/live", headers={"x-request-id": "plain-1"})
        assert response.headers["x-request-id"] == "plain-1"
        deadline = time.time() + 10
        while "request_id=plain-1" not in text.log.read_text() and time.time() < deadline:
            time.sleep(0.1)
        [line] = [line for line in text.log.read_text().splitlines() if "request_id=plain-1" in line]
        assert " INFO instanas.access: " in line and '"GET /healthz/live" 200' in line and not line.startswith("{")
    finally:
        text.stop()
    quiet = Server(path, tmp_path / "quiet.log", INSTANAS_ACCESS_LOG="false")
    warning = Server(path, tmp_path / "warning.log", INSTANAS_LOG_LEVEL="warning")
    try:
        for srv in (quiet, warning):
            response = httpx.get(srv.url + "/healthz/live", headers={"x-request-id": "still-echoed"})
            assert response.headers["x-request-id"] == "still-echoed"
    finally:
        quiet.stop()
        warning.stop()
    # read once they have exited: whatever they were going to log is written
    assert "still-echoed" not in quiet.log.read_text() and "still-echoed" not in warning.log.read_text()
    assert [r for r in records(warning.log) if r["level"] == "INFO"] == []


def test_an_unhandled_error_still_answers_with_the_request_id(bundle, caplog):
    app = create_app(Settings(model=bundle[0]))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("kaput")

    with caplog.at_level(logging.INFO), TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom", headers={"x-request-id": "boom-1"})
        assert response.status_code == 500 and response.headers["x-request-id"] == "boom-1"
        assert response.json()["error"]["code"] == "internal_error"
    [line] = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
    assert line.status == 500 and line.request_id == "boom-1" and line.path == "/boom"
    assert any(r.exc_info for r in caplog.records if r.name == "instanas.service")  # the traceback is logged
