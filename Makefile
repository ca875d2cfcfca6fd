# Two commands do all the set-up (README "Quickstart"): `make demo` and `make test`.
# Each creates the virtual environment .venv on first use (pip takes torch from this machine's
# disk where a constraint caps it at 2.14.1; elsewhere from PyPI).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-all bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cam-monitor demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow" $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
