# The two set-up commands of the README:
#   make serve   run the service on the default bundle (installs the service, no torch)
#   make test    run the whole test suite (installs everything the tests need)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1

.PHONY: serve test install-serve install-dev images train-default evaluate-default clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install-serve: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[serve]'

install-dev: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'

serve: install-serve
	$(BIN)/instanas-serve --model models --default-model cifar10-default --host $(HOST) --port $(PORT)

test: install-dev
	bash scripts/test-setup.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Both container images with podman and no registry: a Debian base from mmdebstrap and the
# Python packages from a wheelhouse downloaded here first (README, "Containers").
images: $(BIN)/python
	PYTHON=$(BIN)/python bash scripts/build-images.sh

# Train the default bundle and its static MobileNetV2 twin (hours on 2 CPU cores). The run
# folder is committed: its latest resumable state is there, so the same command resumes it
# on any machine, any day (see docs/RESULTS.md).
RUN_DEFAULT := docs/runs/cifar10-bnsearch
train-default: install-dev
	$(BIN)/instanas-train all --config cifar10-cpu --data ../shared/data/cifar10-jpeg --out $(RUN_DEFAULT) \
		--bundle models/cifar10-default --bundle-name cifar10-default

# Accuracy and executor latency of the default bundle through the served path (docs/RESULTS.md).
evaluate-default: install-serve
	$(BIN)/python scripts/evaluate_bundle.py --model models/cifar10-default \
		--data ../shared/data/cifar10-jpeg/test.tar.gz --json docs/cifar10-default-evaluation.json

clean:
	rm -rf $(VENV) runs .pytest_cache wheelhouse
