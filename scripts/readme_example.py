"""The docs' example responses: what the default bundle answers for one CIFAR-10 test image.

    .venv/bin/python scripts/readme_example.py            # print README.md's
    .venv/bin/python scripts/readme_example.py --write    # and write every example into the docs

Classifies `test/cat/0000.jpg` of the CIFAR-10 JPEGs with `?top_k=2` through the app in this
process, serving `models/` as `make serve` does, and renders the answer as the docs show it
(figures rounded to 4 decimals). An example is the JSON between `<!-- example-response -->`
markers in README.md or docs/API.md; a marker may name more query parameters
(`<!-- example-response operating_point=A -->`). `--write` writes every one again;
tests/test_default_bundle.py holds each to a fresh answer, `latency_ms` aside (it is measured,
so it differs on every request).
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = (README, ROOT / "docs" / "API.md")
IMAGE = "cat/0000.jpg"  # of the test archive
MARKERS = re.compile(r"(<!-- example-response ?([^>]*?) ?-->\n```json\n)(.*?)(```\n<!-- /example-response -->)",
                     re.DOTALL)


def answer(data: Path = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "test.tar.gz", query: str = "") -> dict:
    """The served default bundle's answer for the example image (`query`: more parameters), figures rounded."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    with tarfile.open(data) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(IMAGE))
        image = archive.extractfile(member).read()
    app = create_app(Settings(model=str(ROOT / "models"), default_model="cifar10-default", access_log=False))
    with TestClient(app) as client:
        params = {"top_k": 2, **dict(p.split("=", 1) for p in query.split("&") if p)}
        response = client.post("/classify", params=params, content=image, headers={"content-type": "image/jpeg"})
    response.raise_for_status()
    return _rounded(response.json())


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def render(body: dict) -> str:
    """The JSON with each top-level field on a line; `architecture` and `cascade` one level deeper,
    each cell and stage on a line."""
    def block(key: str, value, indent: str, last: bool) -> list[str]:
        comma = "" if last else ","
        if isinstance(value, dict) and key in ("architecture", "cascade"):
            inner = list(value.items())
            return [f'{indent}"{key}": {{', *[line for i, (k, v) in enumerate(inner)
                                              for line in block(k, v, indent + "  ", i == len(inner) - 1)],
                    f"{indent}}}{comma}"]
        if isinstance(value, list) and value and isinstance(value[0], dict) and key in ("cells", "stages"):
            return [f'{indent}"{key}": [', *[f"{indent}  {json.dumps(v)}" + ("" if i == len(value) - 1 else ",")
                                            for i, v in enumerate(value)], f"{indent}]{comma}"]
        return [f'{indent}"{key}": {json.dumps(value)}{comma}']

    items = list(body.items())
    return "\n".join(["{", *[line for i, (k, v) in enumerate(items) for line in block(k, v, "  ", i == len(items) - 1)],
                      "}"]) + "\n"


def shown() -> list[tuple[Path, str, dict]]:
    """Every example the docs show: (page, its query, the JSON parsed)."""
    return [(page, m.group(2), json.loads(m.group(3))) for page in PAGES for m in MARKERS.finditer(page.read_text())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="write every example into the docs")
    args = parser.parse_args()
    print(render(answer()), end="")
    if args.write:
        for page in PAGES:
            text = page.read_text()
            page.write_text(MARKERS.sub(lambda m: m.group(1) + render(answer(query=m.group(2))) + m.group(4), text))


if __name__ == "__main__":
    main()
