"""Fuzzing with a bounded budget, in CI:

- schemathesis generates requests from the service's own OpenAPI document and sends them to a real
  server; no response may be a 500, and every response must conform to the document (status code
  documented, content type, body schema). A documented 503 refusal is not a failure. Derandomized
  (the same examples every run), at most MAX_EXAMPLES an operation, at least MIN_EXAMPLES in all.
- atheris (coverage-guided, libFuzzer) on the decode path (tests/fuzz_decode.py): only
  imaging.ImageError may come out of decoding; at least MIN_EXECUTIONS inputs.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                                response_schema_conformance, status_code_conformance)

from tests import hostile as h
from tests.conftest import BIN, ROOT, Server

MAX_EXAMPLES = 60  # per operation
MIN_EXAMPLES = 250  # in all, across operations (simple operations have few distinct examples)
MIN_EXECUTIONS = 20_000  # atheris inputs through the decode path
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]

examples: Counter = Counter()


BUNDLE = ROOT / "models" / "cifar10-default"


def _document() -> dict:
    """The OpenAPI document the server below serves: the same app, same bundle, built in-process.
    (Loaded at import: schemathesis' lazy `from_fixture` does not work with pytest 9.)"""
    from service.app import create_app
    from service.settings import Settings

    return create_app(Settings(model=BUNDLE)).openapi()


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    srv = Server(BUNDLE, tmp_path_factory.mktemp("fuzz") / "server.log", INSTANAS_ACCESS_LOG="false",
                 INSTANAS_BODY_TIMEOUT="5", INSTANAS_LOG_FORMAT="text")
    yield srv
    srv.stop()


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_own_document(case, fuzz_server):
    examples[f"{case.method} {case.path}"] += 1
    case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=30)


def test_fuzzing_ran_enough_examples(fuzz_server):
    """After the fuzzing above (pytest runs this file in order): its budget was really spent."""
    total = sum(examples.values())
    print(f"schemathesis: {total} examples: {dict(examples)}")
    assert total >= MIN_EXAMPLES, examples
    assert examples["POST /classify"] >= MAX_EXAMPLES // 2, examples
    assert fuzz_server.process.poll() is None
    assert "Traceback" not in fuzz_server.log.read_text()


def test_the_document_bounds_top_k_by_the_classes(fuzz_server):
    import httpx

    served = httpx.get(fuzz_server.url + "/openapi.json").json()
    assert served == DOCUMENT  # what is fuzzed is what the server says
    parameters = served["paths"]["/classify"]["post"]["parameters"]
    top_k = next(p for p in parameters if p["name"] == "top_k")
    integer = next(b for b in top_k["schema"]["anyOf"] if b.get("type") == "integer")
    assert integer["minimum"] == 1 and integer["maximum"] == 10  # CIFAR-10's classes


def test_decoding_survives_coverage_guided_fuzzing(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seeds = {"a.jpg": h.jpeg(), "b.png": h.encode(h.picture(), "PNG"), "c.gif": h.animated_gif(3),
             "d.tif": h.encode(h.picture((8, 8)), "TIFF"), "e.webp": h.encode(h.picture((16, 16)), "WEBP"),
             "f.bmp": h.encode(h.picture((8, 8)), "BMP"), "g.jpg": h.mpo(), "h.png": h.png_16bit(),
             "i.jpg": h.jpeg_with_exif_rotation()}
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)
    done = subprocess.run(
        [str(BIN / "python"), str(ROOT / "tests" / "fuzz_decode.py"), f"-runs={MIN_EXECUTIONS}",
         "-max_total_time=600", "-rss_limit_mb=0", "-timeout=20", "-seed=1", str(corpus)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    runs = int(re.search(r"Done (\d+) runs", output).group(1))
    coverage = int(re.findall(r"cov: (\d+)", output)[-1])
    print(f"atheris: {runs} runs, coverage {coverage} edges")
    assert runs >= MIN_EXECUTIONS and coverage > 500
