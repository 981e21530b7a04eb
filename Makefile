# The two set-up commands of the README:
#   make serve   run the service on the default bundle (installs the service, no torch)
#   make test    run the whole test suite (installs everything the tests need)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 127.0.0.1

RUNS ?= runs
MODELS ?= models
CONFIG ?= smoke

.PHONY: serve test install-serve install-train install-dev lock images train train-arguments train-default evaluate-default clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Every install takes exact, hash-checked versions from requirements.lock: the part the extra
# needs, then the project itself (scripts/lock.py). Nothing is resolved against the index.
install-serve: $(BIN)/python
	$(BIN)/python scripts/lock.py install serve

install-train: $(BIN)/python
	$(BIN)/python scripts/lock.py install train

install-dev: $(BIN)/python
	$(BIN)/python scripts/lock.py install dev

# After changing a dependency in pyproject.toml: resolve again and write requirements.lock
# (uv; the locked versions are kept where they still fit). UPGRADE=1: the newest releases allowed.
lock: install-dev
	$(BIN)/python scripts/lock.py compile $(if $(UPGRADE),--upgrade)

serve: install-serve
	$(BIN)/instanas-serve --model models --default-model cifar10-default --host $(HOST) --port $(PORT)

test: install-dev
	bash scripts/test-setup.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Train on your own images (README, "Train on your own images"): DATA holds train/ and test/, one
# subfolder per class, images of any size; NAME names the run ($(RUNS)/NAME) and the bundle
# ($(MODELS)/NAME, beside the default one). Inputs are normalised by statistics measured on DATA.
# CONFIG: a preset or a JSON file (smoke: minutes, a quick look); SET: more section.key=value items.
train: train-arguments install-train
	$(BIN)/instanas-train all --config $(CONFIG) --data $(DATA) --out $(RUNS)/$(NAME) --bundle $(MODELS)/$(NAME) \
		--bundle-name $(NAME) --set data.mean=null --set data.std=null $(foreach s,$(SET),--set $(s))

train-arguments:
	@test -n "$(DATA)" -a -n "$(NAME)" || { echo "usage: make train DATA=<folder> NAME=<bundle name> [CONFIG=smoke] [SET='section.key=value ...']" >&2; exit 2; }

# Both container images with podman and no registry: a Debian base from mmdebstrap and the
# Python packages from a wheelhouse downloaded here first (docs/OPERATIONS.md, "Containers").
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
