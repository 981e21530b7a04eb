"""The import graph of the project's packages, and its circles.

Every `import` and `from ... import` in a package's modules counts, at module level or inside a
function (a late import that closes a circle is still one), `if TYPE_CHECKING:` blocks aside:
they never run. An edge A -> B means A imports B (`from pkg import mod` imports `pkg.mod` when
that is a module, else `pkg`). A circle is a strongly connected set of two modules or more; a
graph without one can be read bottom-up, every import pointing down.

    .venv/bin/python scripts/import_graph.py service training     # exit 1 on a circle
    .venv/bin/python scripts/import_graph.py training --edges       # the edges, one per line
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def modules(package: str, root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (its `__init__` as the package's name)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, name: str, is_package: bool) -> list[str]:
    """Every module name an import statement in `tree` names, relative imports resolved."""
    found = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            found.append(base)
            found.extend(f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return found


def graph(packages: list[str], root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (within `packages`)."""
    known = {}
    for package in packages:
        known.update(modules(package, root))
    edges = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for imported in _imports(tree, name, path.name == "__init__.py"):
            if imported in known:
                targets.add(imported)
            elif imported.rsplit(".", 1)[0] in known:  # `from pkg.mod import function`
                targets.add(imported.rsplit(".", 1)[0])
        targets.discard(name)
        edges[name] = targets
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of two modules or more (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node:
                        break
                if len(members) > 1:
                    found.append(sorted(members))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="+", help="top-level package folders, e.g. service training")
    parser.add_argument("--edges", action="store_true", help="print every edge")
    args = parser.parse_args(argv)
    edges = graph(args.packages)
    if args.edges:
        for name in sorted(edges):
            for target in sorted(edges[name]):
                print(f"{name} -> {target}")
    found = circles(edges)
    for members in found:
        inner = [f"{a} -> {b}" for a in members for b in sorted(edges[a]) if b in members]
        print(f"circle of {len(members)} modules: " + ", ".join(inner))
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(found)} circles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
