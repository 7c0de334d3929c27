# Set-up and everyday commands. A fresh machine needs only Python 3.10+ (and make).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install serve test lint bench check-reference clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build where a CPU one is wanted
install: $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'

serve: install
	$(BIN)/ldserve serve

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

check-reference: install
	$(BIN)/python -m model_loader.check_reference tests/fixtures/reference/tiny2b
	$(BIN)/python -m model_loader.check_reference tests/fixtures/reference/tiny8b

bench: install
	$(BIN)/python -m pruning.bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
