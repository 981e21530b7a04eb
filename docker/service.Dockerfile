# syntax=docker/dockerfile:1
# The HTTP API image. It installs only `.[serve]`: onnxruntime runs the bundle, so no torch.
#
# Offline and pinned: every Python package comes from wheelhouse/serve/, which
# scripts/build-images.sh downloads on the host beforehand (the part of requirements.lock that
# `.[serve]` needs: the versions the tests run, hash-checked) with requirements.txt, the exact
# version and sha256 of every wheel; the build itself reaches no index.
#   scripts/build-images.sh api             # wheelhouse, then this image with podman
#   scripts/build-images.sh --wheels-only   # wheelhouse only, then for example:
#   docker build -f docker/service.Dockerfile -t instanas-api .
# BASE is any Debian-like image with python3 (3.11) and its venv module: python:3.11-slim-bookworm
# from a registry, or the mmdebstrap-built one that scripts/build-images.sh imports (no registry).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# python3, not python: Debian's own python3 has no `python`. The venv provides `python` for the
# runtime stage (HEALTHCHECK, compose) and is the one folder that stage copies.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY wheelhouse/serve/ /wheels/
# Dependencies first, exactly the locked wheels (hash-checked): this layer is reused until the
# wheelhouse changes, so editing the service rebuilds only the small layers below.
RUN pip install --no-index --find-links=/wheels --require-hashes --requirement /wheels/requirements.txt
WORKDIR /src
COPY pyproject.toml ./
COPY service/ service/
# Not editable: the runtime stage installs this wheel and never sees the sources.
RUN pip wheel --no-index --find-links=/wheels --no-deps --wheel-dir /dist .

FROM ${BASE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    INSTANAS_MODEL=/app/models \
    INSTANAS_HOST=0.0.0.0 \
    INSTANAS_PORT=8000
RUN groupadd --system --gid 10001 instanas \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin instanas
COPY --from=build /opt/venv /opt/venv
# The project itself, with `[serve]` resolved against the locked versions already in the venv:
# offline, and it fails if pyproject.toml wants anything the wheelhouse does not pin.
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-index "$(echo /tmp/dist/instanas-*.whl)[serve]" \
    && pip check \
    && rm -rf /tmp/dist
WORKDIR /app
# Bundles are read-only data: owned by root, readable by the service user.
COPY models/ models/
# Numeric, so a runtime can tell it is not root without the image's /etc/passwd.
USER 10001:10001
EXPOSE 8000
# Ready, not just live: the bundle is loaded and verified. urllib, since slim images have no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz/ready', timeout=2).status != 200)"]
CMD ["instanas-serve", "--model", "/app/models", "--default-model", "cifar10-default", "--host", "0.0.0.0", "--port", "8000"]
