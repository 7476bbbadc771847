# cycleprune: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# pytest-xdist workers for `make test`/`test-fast` (CI has 2 cores; 0, 1 or empty: one process).
TEST_WORKERS ?= 2
XDIST := $(if $(filter-out 0 1,$(strip $(TEST_WORKERS))),-n $(TEST_WORKERS) --dist loadfile)

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

# A venv whose pip does not run (e.g. Debian without python3-venv stopped half-way), or one made
# by a Python older than 3.11, is made anew.
$(STAMP): requirements.txt pyproject.toml
	@{ $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' && \
	  $(PY) -m pip --version; } >/dev/null 2>&1 || { \
	  $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	    echo "error: cycleprune needs Python >= 3.11; '$(PYTHON)' is missing or older (set PYTHON=python3.11)" >&2; \
	    exit 1; }; \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) || { \
	    echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt install python3-venv" >&2; \
	    rm -rf $(VENV); exit 1; }; }
	$(PY) -m pip install --quiet "$$(grep -E '^pip==' requirements.txt)"
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the pinned requirements (run and test do this too)

run: $(STAMP) ## Run the main job: the pipeline on the bundled PneumoniaMNIST (ARGS="--preset smoke")
	$(PY) -m cycleprune run $(ARGS)

test: $(STAMP) ## Run the whole test suite (what CI runs)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(XDIST) --durations=20 $(ARGS)

test-fast: $(STAMP) ## Run the tests not marked slow
	$(PY) -m pytest -q $(XDIST) -m "not slow" $(ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP) ## Format and sort imports with ruff
	$(PY) -m ruff check --fix --select I .
	$(PY) -m ruff format .

lock: ## Re-pin requirements.txt from requirements.in in a fresh virtualenv
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -r requirements.in
	( echo "# Pinned by \`make lock\` from requirements.in. Do not edit by hand."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable ) > requirements.txt
	rm -rf .lock-venv

# pip-audit runs from a throwaway virtualenv, so neither it nor its dependencies enter the lock.
# --strict: a package it cannot check (not on PyPI, no network) fails the audit instead of passing.
PIP_AUDIT ?= pip-audit==2.10.1
audit: ## Check the pinned requirements for known vulnerabilities (pip-audit, throwaway venv)
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(PYTHON) -m venv "$$tmp" && \
	  "$$tmp/bin/pip" install --quiet "$(PIP_AUDIT)" && \
	  "$$tmp/bin/pip-audit" --strict --disable-pip --no-deps --progress-spinner off \
	    --desc on -r requirements.txt

bench: $(STAMP) ## Run the benchmarks (QUICK=1 for a smoke check); results in benchmarks/results/
	$(PY) -m benchmarks.run $(if $(QUICK),--quick,) $(ARGS)

compile: $(STAMP) ## Compile the pipeline for $(IMAGE): IR YAML + Kubernetes manifests into build/compiled
	$(PY) -m cycleprune compile --out build/compiled --image "$(IMAGE)" $(ARGS)

tensorboard: $(STAMP) ## Open TensorBoard on a run's logs (RUN=runs/<timestamp>, default: the latest)
	$(VENV)/bin/tensorboard --logdir "$${RUN:-$$(ls -d runs/2* | tail -n 1)}/tensorboard"

clean: ## Remove caches and local runs (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache build *.egg-info

.PHONY: help install run test test-fast lint format lock audit bench compile tensorboard clean

# ---- image and cluster manifests -------------------------------------------------------------
# The image tag is the one the pipeline compiler writes as every component's base_image:
# <repository of pipelines.DEFAULT_IMAGE>:<cycleprune.__version__>.
VERSION ?= $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' cycleprune/__init__.py)
IMAGE_REPO ?= $(shell $(PY) -c 'from pipelines import DEFAULT_IMAGE; print(DEFAULT_IMAGE.rpartition(":")[0])' 2>/dev/null || echo ghcr.io/cycleprune/cycleprune)
IMAGE ?= $(IMAGE_REPO):$(VERSION)
DOCKER ?= docker

image: ## Build the component image IMAGE_REPO:VERSION from docker/Dockerfile (needs Docker)
	$(DOCKER) build -f docker/Dockerfile -t $(IMAGE) \
	  --build-arg VERSION=$(VERSION) \
	  --build-arg REVISION=$$(git rev-parse HEAD 2>/dev/null || echo unknown) .

# A pushed tag is never rewritten: nodes keep an image tag they have pulled (IfNotPresent) and
# KFP's cache keys on the image name, so new code under an old tag might never run.
push: image ## Push the component image to its registry (run `docker login` first); never rewrites a tag
	@if $(DOCKER) manifest inspect $(IMAGE) >/dev/null 2>&1 && [ "$(OVERWRITE)" != 1 ]; then \
	  echo "error: $(IMAGE) is already in the registry; bump __version__ in cycleprune/__init__.py for new code (OVERWRITE=1 rewrites the tag anyway)" >&2; \
	  exit 2; \
	fi
	$(DOCKER) push $(IMAGE)

manifests: $(STAMP) ## Recompile the pipeline (GPU and CPU variants) into manifests/compiled
	$(PY) -m pipelines.manifests --root manifests

lint-docker: $(STAMP) ## Lint docker/Dockerfile with hadolint (no warnings allowed)
	$(VENV)/bin/hadolint docker/Dockerfile

validate-manifests: $(STAMP) ## Render every overlay; check schemas, policies, yamllint and drift
	$(PY) -m pytest -q tests/test_manifests.py

.PHONY: image push manifests lint-docker validate-manifests
