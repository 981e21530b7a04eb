# syntax=docker/dockerfile:1
# The offline training image: `.[train]` with the CPU build of torch.
# Build from the repository root:  docker build -f docker/training.Dockerfile -t instanas-train .
# Run:  docker run --rm -v "$PWD/data:/app/data:ro" -v "$PWD/runs:/app/runs" instanas-train \
#         all --config cifar10-cpu --data /app/data/cifar10-jpeg --out /app/runs/cifar10-default

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU-only index: the default index can resolve to multi-GB CUDA wheels.
# `.[train]` below then finds torch==2.13.0 (2.13.0+cpu satisfies the pin) already installed.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml ./
COPY service/ service/
COPY training/ training/
# The versions come from pyproject.toml, so DL3013 (pin pip versions) does not apply here.
# hadolint ignore=DL3013
RUN pip install ".[train]"

FROM python:3.11-slim-bookworm AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    INSTANAS_CACHE=/app/runs/.cache
RUN groupadd --system --gid 10001 instanas \
    && useradd --system --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin instanas
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# Numeric, so a runtime can tell it is not root without the image's /etc/passwd.
USER 10001:10001
# Data in, runs and bundles out: mounted from the host, so results outlive the container.
VOLUME ["/app/data", "/app/runs", "/app/models"]
ENTRYPOINT ["instanas-train"]
CMD ["--help"]
