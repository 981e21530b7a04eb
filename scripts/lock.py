"""requirements.lock: every package any install of this project takes, exact and hash-checked.

The lock is one resolution of `.[dev]` (which holds `.[train]`, which holds `.[serve]`) plus the
tools that install the project (pip, and the build backend pyproject.toml names), for CPython
3.11 on Linux x86_64, written by uv with every file's sha256:

    make lock                               # = python scripts/lock.py compile

An existing lock is kept where it still satisfies pyproject.toml (uv keeps its pins as
preferences); `make lock UPGRADE=1` moves every package to its newest allowed release. torch is
the CPU build `2.13.0+cpu`, found through `INSTANAS_TORCH_FIND_LINKS` (default: pip's own
`PIP_FIND_LINKS` where it is set, else PyTorch's CPU index).

Every install path reads it, taking the part an extra needs (the lock's `# via` annotations are
its dependency graph):

    python scripts/lock.py select serve     # the lock's entries that `.[serve]` needs (no torch)
    python scripts/lock.py install dev      # pip install --require-hashes --no-deps of that part,
                                            # then the project itself (editable), then pip check

`make serve` installs `serve`, `make test` and .ci/run `dev`, scripts/build-images.sh each
image's extra. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
PROJECT = "instanas"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu/torch/"
DIGEST_LINE = "# pyproject.toml dependencies sha256: "
_ENTRY = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def canonical(name: str) -> str:
    """PEP 503's normalised name: the lock, pip and importlib.metadata spell names differently."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s<>=!~;\[(@]", requirement.strip(), maxsplit=1)[0])


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def dependencies_digest() -> str:
    """sha256 of what the lock is resolved from: pyproject.toml's dependency tables and build backend."""
    pyproject = _pyproject()
    project = pyproject["project"]
    spec = {"requires-python": project.get("requires-python"), "dependencies": project.get("dependencies", []),
            "optional-dependencies": project.get("optional-dependencies", {}),
            "build-system": pyproject["build-system"]["requires"]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def tools() -> list[str]:
    """What installs the project, locked beside it: pip and the build backend."""
    return ["pip", *_pyproject()["build-system"]["requires"]]


def roots(extra: str) -> set[str]:
    """Names the project asks for directly with `extra` (its own `instanas[x]` references followed)."""
    optional = _pyproject()["project"].get("optional-dependencies", {})
    if extra not in optional:
        raise SystemExit(f"lock: no extra {extra!r} in pyproject.toml (there are: {', '.join(optional)})")
    names, todo, seen = {requirement_name(t) for t in tools()}, [extra], set()
    names |= {requirement_name(r) for r in _pyproject()["project"].get("dependencies", [])}
    while todo:
        current = todo.pop()
        seen.add(current)
        for requirement in optional[current]:
            own = re.fullmatch(rf"{PROJECT}\[([\w,\s-]+)\]", requirement.strip())
            if own:
                todo += [e.strip() for e in own.group(1).split(",") if e.strip() not in seen]
            else:
                names.add(requirement_name(requirement))
    return names


@dataclass
class Entry:
    name: str  # canonical
    version: str
    lines: list[str] = field(default_factory=list)  # the entry as the lock writes it, hashes and `# via` included
    parents: set[str] = field(default_factory=set)  # canonical names of the locked packages that need it


def parse(text: str) -> dict[str, Entry]:
    """The lock's entries by canonical name, with who needs each (uv's `# via` annotations)."""
    entries: dict[str, Entry] = {}
    current: Entry | None = None
    in_via = False
    for line in text.splitlines():
        match = _ENTRY.match(line)
        if match:
            current = Entry(canonical(match.group(1)), match.group(2).rstrip("\\").strip(), [line])
            entries[current.name] = current
            in_via = False
        elif current is not None and line.startswith((" ", "\t")):
            current.lines.append(line)
            comment = line.strip()
            if comment.startswith("# via"):
                rest = comment[len("# via"):].strip()
                in_via = not rest  # `# via` alone: one parent per following `#   name` line
                if rest:
                    current.parents.add(rest)
            elif in_via and comment.startswith("#"):
                current.parents.add(comment.lstrip("#").strip())
        else:  # a comment or blank line at the margin ends the entry
            current = None
    for entry in entries.values():  # "instanas (pyproject.toml)", "-r tools.in": roots, not locked packages
        entry.parents = {canonical(p.split()[0]) for p in entry.parents} & entries.keys()
    return entries


def read_lock() -> dict[str, Entry]:
    if not LOCK.exists():
        raise SystemExit(f"lock: {LOCK.name} is missing: run `make lock`")
    return parse(LOCK.read_text())


def select(entries: dict[str, Entry], extra: str) -> list[Entry]:
    """The entries `.[extra]` needs: its roots and everything they need, in the lock's order."""
    children: dict[str, set[str]] = {}
    for entry in entries.values():
        for parent in entry.parents:
            children.setdefault(parent, set()).add(entry.name)
    # A root missing from the lock is one whose marker excludes Linux (or a stale lock: the tests say which).
    wanted, todo = set(), [r for r in roots(extra) if r in entries]
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo += sorted(children.get(name, ()))
    return [e for e in entries.values() if e.name in wanted]


def requirements_text(chosen: list[Entry], extra: str) -> str:
    header = (f"# The part of requirements.lock that instanas[{extra}] needs, hash-checked: written by\n"
              f"# `python scripts/lock.py select {extra}`. Do not edit: `make lock` changes the lock.\n")
    return header + "".join("\n".join(e.lines) + "\n" for e in chosen)


def compile_lock(upgrade: bool) -> None:
    """Resolve `.[dev]` and the tools with uv and write the lock with every file's hash."""
    find_links = os.environ.get("INSTANAS_TORCH_FIND_LINKS") or os.environ.get("PIP_FIND_LINKS") or TORCH_INDEX
    folder = tempfile.mkdtemp()
    tools_file = Path(folder) / "tools.in"
    tools_file.write_text("\n".join(tools()) + "\n")
    command = [sys.executable, "-m", "uv", "pip", "compile", "pyproject.toml", str(tools_file), "--extra", "dev",
               "--generate-hashes", "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM,
               "--find-links", find_links, "--no-emit-package", PROJECT, "--custom-compile-command", "make lock",
               "--quiet", "--output-file", str(LOCK)]
    if upgrade:
        command.append("--upgrade")
    try:
        subprocess.run(command, check=True, cwd=ROOT)
    finally:
        shutil.rmtree(folder)
    # uv names the temporary tools file as a parent of pip and the build backend: a stable name instead.
    text = LOCK.read_text().replace(f"-r {tools_file}", "-r tools.in (pip, the build backend)")
    text = "\n".join(line for line in text.splitlines() if not line.startswith(DIGEST_LINE))
    LOCK.write_text(f"{DIGEST_LINE}{dependencies_digest()}\n{text}\n")
    torch = parse(LOCK.read_text()).get("torch")
    if torch is not None and not torch.version.endswith("+cpu"):
        raise SystemExit(f"lock: torch resolved to {torch.version}, not the CPU build: set INSTANAS_TORCH_FIND_LINKS "
                         "to a folder or page holding torch's +cpu wheel")
    print(f"lock: wrote {LOCK.name} ({len(parse(LOCK.read_text()))} packages)", file=sys.stderr)


def install(extra: str, python: str, editable: bool) -> None:
    """Install exactly the lock's part for `extra` into `python`'s environment, then the project."""
    text = requirements_text(select(read_lock(), extra), extra)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as part:
        part.write(text)
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    try:
        subprocess.run([*pip, "--require-hashes", "--no-deps", "--requirement", part.name], check=True)
    finally:
        os.unlink(part.name)
    # The project: its dependencies are all in place, and its build backend came from the lock.
    project = ["--editable", str(ROOT)] if editable else [str(ROOT)]
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", *project], check=True)
    subprocess.run([python, "-m", "pip", "check", "--disable-pip-version-check"], check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    compiled = sub.add_parser("compile", help="write requirements.lock from pyproject.toml (uv)")
    compiled.add_argument("--upgrade", action="store_true", help="newest allowed releases, not the locked ones")
    chosen = sub.add_parser("select", help="print the lock's entries an extra needs")
    chosen.add_argument("extra")
    chosen.add_argument("--package", help="only this package's entry")
    installed = sub.add_parser("install", help="install an extra's part of the lock, then the project")
    installed.add_argument("extra")
    installed.add_argument("--python", default=sys.executable, help="the environment's interpreter [this one]")
    installed.add_argument("--no-editable", dest="editable", action="store_false")
    args = parser.parse_args(argv)
    if args.command == "compile":
        compile_lock(args.upgrade)
    elif args.command == "select":
        chosen_entries = select(read_lock(), args.extra)
        if args.package:
            chosen_entries = [e for e in chosen_entries if e.name == canonical(args.package)]
            if not chosen_entries:
                raise SystemExit(f"lock: instanas[{args.extra}] needs no {args.package}")
        sys.stdout.write(requirements_text(chosen_entries, args.extra))
    else:
        install(args.extra, args.python, args.editable)


if __name__ == "__main__":
    main()
