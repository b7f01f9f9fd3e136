# Everything a fresh machine with Python 3.11+ and make needs: `make serve`, `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: serve test lint format proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

serve: $(STAMP)  ## run the server on the CPU (HOST, PORT to change where it listens)
	JAX_PLATFORMS=$${JAX_PLATFORMS-cpu} $(BIN)/hessd serve --host $${HOST:-127.0.0.1} --port $${PORT:-50051}

test: $(STAMP)  ## the whole suite
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: $(STAMP)  ## regenerate proto/v1/*_pb2*.py from proto/v1/hessd.proto
	$(BIN)/python proto/generate.py

bench: $(STAMP)  ## the service against in-process JAX and the raw transport; writes benchmarks/results/
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
