"""The packages read bottom-up: no import circle in `service/` or `training/` (late imports
inside functions included), and the service never imports training."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import import_graph  # noqa: E402  (scripts/import_graph.py)


def test_no_import_circle_in_either_package():
    edges = import_graph.graph(["service", "training"])
    assert len(edges) > 60
    assert import_graph.circles(edges) == []


def test_the_service_imports_nothing_from_training():
    edges = import_graph.graph(["service", "training"])
    assert not [(a, b) for a, targets in edges.items() if a.startswith("service") for b in targets
                if b.startswith("training")]


def test_circles_are_found_late_imports_included(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n")
    (pkg / "c.py").write_text("from . import a\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n")
    (pkg / "d.py").write_text("import pkg.c\n")
    edges = import_graph.graph(["pkg"], root=tmp_path)
    assert edges["pkg.c"] == {"pkg", "pkg.a"} and edges["pkg.d"] == {"pkg.c"}
    assert import_graph.circles(edges) == [["pkg.a", "pkg.b", "pkg.c"]]
