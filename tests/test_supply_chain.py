"""Supply chain: one lock, read by every install, and the environment the tests run in is it.

requirements.lock (scripts/lock.py, `make lock`) pins every package of `.[dev]` and the tools that
install the project, with sha256s. `make serve`, `make test` (so .ci/run) and the image
wheelhouses (scripts/build-images.sh) install the part of it their extra needs, hash-checked and
with no resolution, so a fresh machine builds what CI tested, not whatever the index serves
today. These tests fail when the lock no longer matches pyproject.toml (run `make lock`), or when
the environment running them differs from it (recreate it: `make clean test`).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import lock  # noqa: E402 - scripts/lock.py, standard library only

DOCKERFILE = ROOT / "docker" / "service.Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The lock's target, and the images': CPython 3.11 on Linux x86_64.
LOCK_ENV = {**default_environment(), "python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux",
            "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython"}
ENTRIES = lock.read_lock()


def locked(extra: str) -> dict[str, str]:
    return {e.name: e.version for e in lock.select(ENTRIES, extra)}


def requirements_of(extra: str) -> list[Requirement]:
    """pyproject.toml's requirements that `.[extra]` installs on the lock's target."""
    project = PYPROJECT["project"]
    out, todo, seen = [Requirement(r) for r in project["dependencies"]], [extra], set()
    while todo:
        current = todo.pop()
        seen.add(current)
        for line in project["optional-dependencies"][current]:
            req = Requirement(line)
            if req.name == "instanas":
                todo += [e for e in req.extras if e not in seen]
            elif req.marker is None or req.marker.evaluate({**LOCK_ENV, "extra": ""}):
                out.append(req)
    return out


def installed_closure(extra: str) -> dict[str, str]:
    """{name: installed version} of every distribution `.[extra]` needs, from the installed metadata."""
    out: dict[str, str] = {}
    todo = [(r, "") for r in requirements_of(extra)]
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        if name in out:
            continue
        dist = metadata.distribution(req.name)
        out[name] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            wanted = list(req.extras) or [""]
            if sub.marker is None or any(sub.marker.evaluate({**LOCK_ENV, "extra": e}) for e in wanted):
                todo.append((sub, ""))
    return dict(sorted(out.items()))


def test_the_lock_was_made_from_this_pyproject():
    header = (ROOT / "requirements.lock").read_text().splitlines()[0]
    assert header == f"{lock.DIGEST_LINE}{lock.dependencies_digest()}", "requirements.lock is stale: run `make lock`"


def test_every_entry_is_an_exact_pin_with_hashes():
    assert len(ENTRIES) > 50
    for entry in ENTRIES.values():
        assert any("--hash=sha256:" in line for line in entry.lines), entry.name
        assert entry.parents or any("via" in line for line in entry.lines), f"{entry.name}: nothing needs it"


def test_the_lock_satisfies_pyproject():
    for extra in ("serve", "train", "dev"):
        chosen = locked(extra)
        for req in requirements_of(extra):
            name = canonicalize_name(req.name)
            assert name in chosen, f"{req} of .[{extra}] is not locked: run `make lock`"
            assert req.specifier.contains(chosen[name], prereleases=True), f"locked {name}=={chosen[name]}, wanted {req}"
    build = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    for req in build:
        assert req.specifier.contains(ENTRIES[canonicalize_name(req.name)].version), req


def test_every_locked_package_is_needed_and_torch_is_the_cpu_build():
    assert set(locked("dev")) == set(ENTRIES), "the lock holds packages nothing needs: run `make lock`"
    assert ENTRIES["torch"].version == "2.13.0+cpu"
    assert "torch" in locked("train") and "torch" not in locked("serve")
    assert not any(name.startswith("nvidia-") or name == "triton" for name in ENTRIES), "a CUDA build of torch"


def test_the_environment_running_the_tests_is_exactly_the_lock():
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("instanas")
    extra = {n: v for n, v in installed.items() if n not in ENTRIES}
    differ = {n: (installed.get(n), v) for n, v in locked("dev").items() if installed.get(n) != v}
    assert not differ, f"installed and locked versions differ (installed, locked): {differ}; run `make clean test`"
    assert not extra, f"installed but not locked: {extra}; run `make clean test`"


@pytest.mark.parametrize("extra", ["serve", "train"])
def test_an_extras_part_of_the_lock_is_its_dependency_closure(extra):
    """What `make serve` and the images install is what the metadata says the extra needs, plus
    the tools that install the project (pip, the build backend): nothing missing, nothing more."""
    tools = {lock.requirement_name(t) for t in lock.tools()}
    assert set(locked(extra)) - tools == set(installed_closure(extra)) - tools


def test_select_prints_the_lock_entries_unchanged(tmp_path):
    """`lock.py select` (what every install reads) copies the lock's entries, hashes included."""
    part = tmp_path / "serve.txt"
    part.write_text(subprocess.run([sys.executable, str(ROOT / "scripts" / "lock.py"), "select", "serve"],
                                   capture_output=True, text=True, check=True).stdout)
    parsed = lock.parse(part.read_text())
    assert {n: e.version for n, e in parsed.items()} == locked("serve")
    assert all(e.lines == ENTRIES[n].lines for n, e in parsed.items())


def test_the_image_installs_locked_wheels_only():
    """docker/service.Dockerfile installs exact, hash-checked wheels (scripts/build-images.sh
    downloads the lock's part with --require-hashes)."""
    installs = [line for line in DOCKERFILE.read_text().splitlines() if "pip install" in line]
    assert any("--require-hashes" in line for line in installs), installs
    script = (ROOT / "scripts" / "build-images.sh").read_text()
    assert "scripts/lock.py select" in script and "--require-hashes --no-deps" in script


def test_a_local_wheelhouse_matches_the_lock():
    """The image gets what the tests ran: the wheelhouse's pins are the lock's part for its extra."""
    folder = ROOT / "wheelhouse" / "serve"
    # Made or brought up to date (cached by the lock's part: the image test normally made it already).
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build-images.sh"), "--wheels-only", "api"],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    wheels = {}
    for line in (folder / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            wheels[canonicalize_name(name)] = version
    differ = {n: (wheels.get(n), v) for n, v in locked("serve").items() if wheels.get(n) != v}
    assert not differ and set(wheels) == set(locked("serve")), f"wheelhouse and lock differ (wheelhouse, lock): {differ}"


def test_select_follows_the_via_graph_of_a_hand_written_lock(monkeypatch):
    """An extra's part is its roots and what they need, by the `# via` annotations, one or many."""
    text = """# header
fastapi==1.0 \\
    --hash=sha256:aa
    # via instanas (pyproject.toml)
starlette==2.0 \\
    --hash=sha256:bb
    # via
    #   fastapi
    #   schemathesis
schemathesis==3.0 \\
    --hash=sha256:cc
    # via instanas (pyproject.toml)
Typing_Extensions==4.0 \\
    --hash=sha256:dd
    # via starlette
pip==26.0 \\
    --hash=sha256:ee
    # via -r tools.in (pip, the build backend)
"""
    entries = lock.parse(text)
    assert entries["starlette"].parents == {"fastapi", "schemathesis"}
    assert entries["fastapi"].parents == set() and entries["typing-extensions"].version == "4.0"
    monkeypatch.setattr(lock, "roots", lambda extra: {"fastapi", "pip"} if extra == "serve" else set(entries))
    assert [e.name for e in lock.select(entries, "serve")] == ["fastapi", "starlette", "typing-extensions", "pip"]
    assert len(lock.select(entries, "dev")) == 5
    assert lock.requirements_text(lock.select(entries, "serve"), "serve").count("--hash=") == 4
