# Kiln: `make run` sets up and starts everything; `make test` sets up and runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed

.PHONY: run test test-sqlite test-postgresql install chaos bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/kiln up $(ARGS)

# The whole suite on SQLite, then again on PostgreSQL. The engine tests (tests/worker/ml) touch
# no database, so they run once, in the SQLite pass.
PG_ONLY_DB := --ignore=tests/worker/ml

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)
	KILN_TEST_DATABASE=postgresql $(BIN)/python -m pytest -q $(PG_ONLY_DB) $(PYTEST_ARGS)

test-sqlite: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-postgresql: $(STAMP)
	KILN_TEST_DATABASE=postgresql $(BIN)/python -m pytest -q $(PG_ONLY_DB) $(PYTEST_ARGS)

# The control-plane benchmark (docs/benchmarks.md); needs `wrk`. ARGS="--quick" checks the harness in a minute.
bench: $(STAMP)
	$(BIN)/python -m bench.control_plane $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
