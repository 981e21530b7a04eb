# syntax=docker/dockerfile:1
# The offline training image: `.[train]` with the CPU build of torch.
#
# Offline and pinned: every Python package comes from wheelhouse/train/, which
# scripts/build-images.sh downloads on the host beforehand (the part of requirements.lock that
# `.[train]` needs; torch is its CPU build, from the CPU-only index: the default index has
# multi-GB CUDA builds) with requirements.txt, exact versions and sha256.
#   scripts/build-images.sh train           # wheelhouse, then this image with podman
#   scripts/build-images.sh --wheels-only   # wheelhouse only, then for example:
#   docker build -f docker/training.Dockerfile -t instanas-train .
# Run:  docker run --rm -v "$PWD/data:/app/data:ro" -v "$PWD/runs:/app/runs" instanas-train \
#         all --config cifar10-cpu --data /app/data/cifar10-jpeg --out /app/runs/cifar10-default
# BASE: as in docker/service.Dockerfile (python3 3.11 with its venv module; no `python` needed).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY wheelhouse/train/ /wheels/
# Dependencies first (torch included), exactly the locked wheels: reused until the wheelhouse changes.
RUN pip install --no-index --find-links=/wheels --require-hashes --requirement /wheels/requirements.txt
WORKDIR /src
COPY pyproject.toml ./
COPY service/ service/
COPY training/ training/
RUN pip wheel --no-index --find-links=/wheels --no-deps --wheel-dir /dist .

FROM ${BASE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    INSTANAS_CACHE=/app/runs/.cache
RUN groupadd --system --gid 10001 instanas \
    && useradd --system --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin instanas
COPY --from=build /opt/venv /opt/venv
# The project, `[train]` resolved offline against the locked versions already in the venv.
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-index "$(echo /tmp/dist/instanas-*.whl)[train]" \
    && pip check \
    && rm -rf /tmp/dist
WORKDIR /app
# Numeric, so a runtime can tell it is not root without the image's /etc/passwd.
USER 10001:10001
# Data in, runs and bundles out: mounted from the host, so results outlive the container.
VOLUME ["/app/data", "/app/runs", "/app/models"]
ENTRYPOINT ["instanas-train"]
CMD ["--help"]
