# Everything a fresh machine with Python 3.11+ and make needs: `make serve`, `make test`.
# Serving installs the server alone; testing adds the dev toolchain to the same virtualenv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVER := $(VENV)/.installed-server
DEV := $(VENV)/.installed-dev

.PHONY: serve test lint format typecheck proto bench docker-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(SERVER): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server]'
	touch $@

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(SERVER) $@

serve: $(SERVER)  ## run the server on the CPU (HOST, PORT to change where it listens)
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(BIN)/hessd serve --host $${HOST:-127.0.0.1} --port $${PORT:-50051}

test: $(DEV)  ## the whole suite
	$(BIN)/python -m pytest

lint: $(DEV)  ## ruff and the type checker
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(DEV)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: $(DEV)  ## regenerate proto/v1/*_pb2*.py from proto/v1/hessd.proto
	$(BIN)/python proto/generate.py

bench: $(DEV)  ## the service against in-process JAX and the raw transport; writes benchmarks/results/
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/throughput.py

clean:  ## the virtualenv, caches and what the tests and tools leave behind
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis *.egg-info build results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
