# Two commands do all the set-up (README "Quickstart"): `make demo` and `make test`.
# Each creates the virtual environment .venv on first use (pip takes torch from this machine's
# disk where a constraint caps it at 2.14.1; elsewhere from PyPI).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-all test-lightning-oldest bench clean-venv

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

# The Lightning-facing tests against the oldest Lightning that pyproject.toml allows, installed
# beside .venv (no other package changes) and put first on the path.
LIGHTNING_OLDEST := 2.4.0
OLDEST := $(VENV)/lightning-$(LIGHTNING_OLDEST)

$(OLDEST)/.installed: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --target $(OLDEST) lightning==$(LIGHTNING_OLDEST)
	touch $@

test-lightning-oldest: $(OLDEST)/.installed
	PYTHONPATH=$(OLDEST) $(BIN)/python -c "import lightning; assert lightning.__version__ == '$(LIGHTNING_OLDEST)', lightning.__version__"
	PYTHONPATH=$(OLDEST) $(BIN)/python -m pytest $(ARGS) tests/test_wiring.py tests/test_callback.py tests/test_checkpoint.py tests/test_compat.py

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
