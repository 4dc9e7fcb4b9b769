# The two commands in README.md: `make demo` (train a small GPT-2 on the bundled corpus, then sample) and `make test`.
# Each creates .venv on first use and installs only what it runs: the demo the runtime requirements, the tests the
# test requirements on top (PyTorch and transformers, the reference). A .venv built by a Python older than 3.11
# (which jax 0.10 needs) is rebuilt; `make clean-venv` removes it by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime-installed
TESTING := $(VENV)/.test-installed
SUPPORTED := import sys; sys.exit(sys.version_info < (3, 11))

.PHONY: demo test lint format bench smoke-newest clean-venv

# An existing .venv of an unsupported Python: remake its stamps whatever their age, so the recipe below rebuilds it.
ifeq ($(shell test -x $(BIN)/python && $(BIN)/python -c '$(SUPPORTED)' 2>/dev/null || echo old),old)
ifneq ($(wildcard $(BIN)/python),)
.PHONY: $(RUNTIME)
endif
endif

$(RUNTIME): pyproject.toml requirements.txt
	@$(PYTHON) -c '$(SUPPORTED)' 2>/dev/null || { if $(PYTHON) -c '' 2>/dev/null; then \
	  echo "$(PYTHON) is $$($(PYTHON) -V 2>&1), older than the Python 3.11 gpt2-jax needs;\
	 run make again with PYTHON=python3.11 (or python3.12, python3.13)."; else \
	  echo "$(PYTHON) does not run here (not installed, or not on PATH); install Python 3.11 or newer, or name one\
	 that runs, e.g. make $@ PYTHON=/usr/bin/python3.11."; fi; exit 1; }
	@if test -x $(BIN)/python && ! $(BIN)/python -c '$(SUPPORTED)'; then \
	  echo "$(VENV) was built by $$($(BIN)/python -V), older than the 3.11 gpt2-jax needs: rebuilding it."; \
	  rm -rf $(VENV); fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt -e .
	touch $@

$(TESTING): $(RUNTIME) requirements-test.txt
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $@

demo: $(RUNTIME)
	$(BIN)/python train.py

lint: $(TESTING)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(TESTING)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

bench: $(TESTING)
	$(BIN)/python -m benchmarks --suite quick --compare pytorch

# The newest Python (3.13, else 3.12) that the index serves jax for: a wheel of this tree in a fresh venv, then a
# tiny train, sample and convert (.ci/smoke-newest). Without such a Python it says so and succeeds, unless
# REQUIRE_NEWEST=1.
smoke-newest:
	bash .ci/smoke-newest

clean-venv:
	rm -rf $(VENV) .venv-newest
