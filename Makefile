# Everything a user runs: `make run` syncs from the built-in simulator, `make test` tests.
# Both create .venv from pyproject.toml on first use; only python3 is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The project's venv counts as activated for `dg`, which otherwise warns that the active one
# (none) is not the project's.
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
# Every dagster/dg command reads its instance (runs, event log, the change-set partitions)
# from DAGSTER_HOME; without it a command gets a throwaway instance that knows no change set.
# `make` targets use the project's own; by hand, `export DAGSTER_HOME=$PWD/.dagster_home` first.
export DAGSTER_HOME := $(CURDIR)/.dagster_home
# `make dev PORT=3001`: the UI's port (loopback only unless HOST says otherwise).
PORT ?= 3000
HOST ?= 127.0.0.1

.PHONY: run test lint dev validate materialize-example bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(DAGSTER_HOME):
	mkdir -p $(DAGSTER_HOME)
	printf 'telemetry:\n  enabled: false\n' > $(DAGSTER_HOME)/dagster.yaml

run: $(BIN)/.installed $(DAGSTER_HOME)
	$(BIN)/dataverse-assets sync

test: $(BIN)/.installed $(DAGSTER_HOME)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest -q -n 2 --dist loadfile

# Style and the layer contract (pyproject's [tool.importlinter]): `make test` runs both first.
lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The UI, the daemon (schedules, sensors) and the code server: Dagster's `dg dev`, reading
# [tool.dg] in pyproject.toml.
dev: $(BIN)/.installed $(DAGSTER_HOME)
	$(BIN)/dg dev --host $(HOST) --port $(PORT)

# The definitions load as `dg dev` loads them.
validate: $(BIN)/.installed $(DAGSTER_HOME)
	$(BIN)/dg check defs

# The documented CLI path: register a change set, then materialize one group for it.
materialize-example: $(BIN)/.installed $(DAGSTER_HOME)
	key=$$($(BIN)/dataverse-assets change-set create --group daily) && \
	$(BIN)/dg launch --assets 'group:daily' --partition $$key

# The performance suite (benchmarks/run_all.py): 1,000,000 and 100,000 rows, dlt included.
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf data .dagster_home
