"""The documentation names only what exists: links resolve, backticked repository paths exist, presets
are real, and README's set-up section keeps the two commands the Makefile names. The pages describe the
product, not how it was made, so they do not number sessions or cite issues.

Plain file reads and one import of training.config; no network, well under a second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# The authored pages: README, docs/*.md (the reference pages, RESULTS, HOSTILE) and docs/history/*.md.
PAGES = [README, *sorted(DOCS.glob("*.md")), *sorted((DOCS / "history").glob("*.md"))]
# Every Markdown file the links of which must resolve (the run reports under docs/runs/ included).
LINKED = [README, *sorted(DOCS.rglob("*.md"))]

TOP_LEVEL = ("service/", "training/", "scripts/", "tests/", "docs/", "models/", "deploy/", "docker/", ".ci/")
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
INDENTED = re.compile(r"(?:^(?: {4}|\t)[^\n]*\n)+", re.MULTILINE)  # indented code blocks (after a blank line)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _without_blocks(text: str) -> str:
    """The text with fenced code blocks blanked out (lines kept, so line numbers hold)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def _prose(text: str) -> str:
    """The text outside code: fenced and indented blocks and inline code spans blanked out."""
    text = _without_blocks(text)
    text = re.sub(r"(?<=\n\n)" + INDENTED.pattern, lambda m: "\n" * m.group(0).count("\n"), text,
                  flags=re.MULTILINE)
    return CODE_SPAN.sub(lambda m: " " * len(m.group(0)), text)


def _line(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def test_pages_found():
    names = [_name(p) for p in PAGES]
    for page in ("README.md", "docs/API.md", "docs/CONFIGURATION.md", "docs/OPERATIONS.md", "docs/TRAINING.md",
                 "docs/RESULTS.md"):
        assert page in names, f"{page} is missing"
    assert any(n.startswith("docs/history/") for n in names), "docs/history/ holds no page"


@pytest.mark.parametrize("page", LINKED, ids=_name)
def test_relative_links_resolve(page: Path):
    text = page.read_text()
    prose = CODE_SPAN.sub(lambda m: " " * len(m.group(0)), _without_blocks(text))
    broken = []
    for m in LINK.finditer(prose):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http:, https:, mailto: ... and anchors within the page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (page.parent / path).exists():
            broken.append(f"{_name(page)}:{_line(prose, m.start())}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def _repository_path(span: str) -> str | None:
    """The repository path a code span names, or None: a span that is one path starting with a
    top-level folder, without wildcards or placeholders. A `::test` or `:name` suffix is dropped."""
    span = span.strip()
    if not span.startswith(TOP_LEVEL) or re.search(r"\s", span):
        return None
    if re.search(r"[<>*?$\[\]{}]|\.\.\.", span):
        return None  # a placeholder, a wildcard or a shell expansion
    return re.split(r"::|:(?=[A-Za-z_])|#", span, maxsplit=1)[0]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_backticked_paths_exist(page: Path):
    text = page.read_text()
    prose = _without_blocks(text)
    missing = []
    for m in CODE_SPAN.finditer(prose):
        path = _repository_path(m.group(2))
        if path and not (ROOT / path).exists():
            missing.append(f"{_name(page)}:{_line(prose, m.start())}: {path}")
    assert not missing, "backticked paths that do not exist:\n" + "\n".join(missing)


def test_path_rules():
    assert _repository_path("training/config.py") == "training/config.py"
    assert _repository_path("tests/test_overload.py::test_past_capacity_and_back") == "tests/test_overload.py"
    assert _repository_path("training/search.py:window") == "training/search.py"
    assert _repository_path("models/cifar10-default") == "models/cifar10-default"
    assert _repository_path("models/<name>/") is None
    assert _repository_path("docs/bench-w$1-c$2.json") is None
    assert _repository_path("docs/runs/*/config.json") is None
    assert _repository_path("instanas-bench --model models/cifar10-default") is None
    assert _repository_path("networks/mobilenet_v2") is None


WORDS = re.compile(r"\b(sessions?|issues?)\b", re.IGNORECASE)


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_no_session_or_issue_words(page: Path):
    prose = _prose(page.read_text())
    found = [f"{_name(page)}:{_line(prose, m.start())}: {m.group(0)}" for m in WORDS.finditer(prose)]
    assert not found, "the pages describe the product, not how it was made:\n" + "\n".join(found)


def test_word_rule():
    assert WORDS.search("the issue's target") and WORDS.search("Sessions") and WORDS.search("session 6")
    assert not WORDS.search("InferenceSession") and not WORDS.search("session_options")
    assert not WORDS.search(_prose("uses `InferenceSession` and\n\n```\nsession = 1\n```\n"))


def _setup_commands() -> list[str]:
    """The set-up commands the Makefile's header names: `#   make serve   run the service ...`."""
    commands = []
    for line in (ROOT / "Makefile").read_text().splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s+(make \S+)\s{2,}", line)
        if m:
            commands.append(m.group(1))
    return commands


def test_readme_setup_has_exactly_the_two_commands():
    commands = _setup_commands()
    assert commands == ["make serve", "make test"], f"the Makefile's header names {commands}"
    text = README.read_text()
    m = re.search(r"^## Set up on a fresh machine\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert m, "README.md has no '## Set up on a fresh machine' section"
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", m.group(1), re.MULTILINE | re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]
    found = [line.split("#", 1)[0].strip() for line in lines]
    assert found == commands, f"README's set-up section runs {found}, the Makefile names {commands}"
    assert lines[0].startswith("make serve   # ") and lines[1].startswith("make test    # ")


def test_presets_named_in_docs_exist():
    from training.config import PRESETS

    unknown = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"--config[ =]+([^\s`'\"\\)|,;]+)", text):
            name = m.group(1)
            if name.endswith(".json") or name.startswith(("<", "$", "-")):
                continue  # a JSON file, a placeholder, or another option
            if name not in PRESETS:
                unknown.append(f"{_name(page)}:{_line(text, m.start())}: --config {name}")
    assert not unknown, f"not presets ({', '.join(PRESETS)}):\n" + "\n".join(unknown)
