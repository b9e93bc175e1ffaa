PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint clean bench bench-full

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

run: | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(BIN)/sse-broker serve --allow-anonymous-publish $(ARGS)

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check broker tests bench
	$(BIN)/ruff format --check broker tests bench
	$(BIN)/mypy

# The benchmark's own dependencies (the baseline servers' libraries, matplotlib) are
# installed only here. `make bench`: quick mode, under 5 minutes; ARGS passes options
# to bench/run.py (e.g. ARGS='--servers broker,raw_asyncio --scenarios fanout').
$(BENCH_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --mode quick $(ARGS)

bench-full: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --mode full $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
