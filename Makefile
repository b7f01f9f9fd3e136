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

lint: $(DEV) typecheck  ## ruff, the type checker and the layering contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# mypy resolves hessd.* through a tree of links, since the folders are mapped to packages
# by setuptools (pyproject.toml), which only the editable install's import hook knows.
typecheck: $(DEV)
	mkdir -p build/types/hessd
	for p in proto service client tools; do ln -sfn ../../../$$p build/types/hessd/$$p; done
	cd build/types && ../../$(BIN)/mypy --config-file ../../pyproject.toml \
		-p hessd.proto -p hessd.service -p hessd.client -p hessd.tools

format: $(DEV)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: $(DEV)  ## regenerate proto/v1/*_pb2*.py from proto/v1/hessd.proto
	$(BIN)/python proto/generate.py

bench: $(DEV)  ## the service against in-process JAX and the raw transport; writes benchmarks/results/
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/throughput.py

docker-test: $(SERVER)  ## build the CPU image, run three replicas in Docker, check them (docker/README.md)
	PYTHON=$(BIN)/python docker/test.sh

clean:  ## the virtualenv, caches and what the tests and tools leave behind
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis *.egg-info build results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
