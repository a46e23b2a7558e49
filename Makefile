# Two entry points on a fresh machine: `make run` (the main job on its bundled sample) and
# `make test` (the whole suite). Both build .venv first: torch 2.13.0 before the project,
# so pip never pulls a multi-GB CUDA build on CPU machines.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-fast test-e2e test-long lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,mteb,int8,lance]'
	touch $@

setup: $(BIN)/.installed

# RAY_ADDRESS=local: start a private local Ray even if another cluster runs on this machine
# (set RAY_ADDRESS to use a cluster instead).
run: setup
	RAY_ADDRESS=$${RAY_ADDRESS:-local} $(BIN)/python pipelines/embed_corpus.py $(ARGS)

# The suite: everything but the process-level end-to-end runs (`make test-e2e`) and the
# fault drills (`make test-long`). Two pytest workers (a file's tests stay on one worker,
# each worker has its own Ray session): most Ray tests wait on process start-ups, so two
# streams keep both cores busy.
XDIST ?= -n 2 --dist loadfile
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not long and not e2e" $(XDIST) $(PYTEST_ARGS)

# The `e2e` runs: a second cluster on this machine (two raylets, a `ray start` job server),
# a worker killed and resumed, the whole recipe chain, the server script stopped by Ctrl-C.
# CI runs them after `make test` (.ci/run).
test-e2e: setup
	$(BIN)/python -m pytest -q -m "e2e and not long" $(XDIST) $(PYTEST_ARGS)

# The fault drills (node loss, flaky object store): minutes, run before a release.
test-long: setup
	$(BIN)/python -m pytest -q -m long $(PYTEST_ARGS)

# Every test that needs no Ray cluster (marker `ray`, see pyproject.toml): the quick loop.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not ray and not long and not e2e" $(XDIST) $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
