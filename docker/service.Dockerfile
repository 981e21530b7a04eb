# syntax=docker/dockerfile:1
# The HTTP API image. It installs only `.[serve]`: onnxruntime runs the bundle, so no torch.
# Build from the repository root:  docker build -f docker/service.Dockerfile -t instanas-api .

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A virtualenv is the one folder the runtime stage has to copy.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
COPY service/ service/
# Not editable: the runtime stage keeps the installed package and drops the sources.
# The versions come from pyproject.toml, so DL3013 (pin pip versions) does not apply here.
# hadolint ignore=DL3013
RUN pip install ".[serve]"

FROM python:3.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    INSTANAS_MODEL=/app/models/cifar10-default \
    INSTANAS_HOST=0.0.0.0 \
    INSTANAS_PORT=8000
RUN groupadd --system --gid 10001 instanas \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin instanas
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Bundles are read-only data: owned by root, readable by the service user.
COPY models/ models/
# Numeric, so a runtime can tell it is not root without the image's /etc/passwd.
USER 10001:10001
EXPOSE 8000
# Ready, not just live: the bundle is loaded and verified. urllib, since slim images have no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz/ready', timeout=2).status != 200)"]
CMD ["instanas-serve", "--model", "/app/models/cifar10-default", "--host", "0.0.0.0", "--port", "8000"]
