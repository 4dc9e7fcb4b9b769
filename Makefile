# The two commands in README.md: `make demo` (train a small GPT-2 on the bundled corpus, then sample) and
# `make test`. Both create and fill .venv on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint format bench clean-venv

$(STAMP): pyproject.toml requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-test.txt -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python train.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

bench: $(STAMP)
	$(BIN)/python -m benchmarks --suite quick --compare pytorch

clean-venv:
	rm -rf $(VENV)
