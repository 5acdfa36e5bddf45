# The two Quickstart commands (`make demo`, `make test`) create .venv and
# install the project into it on first use; later runs reuse it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNS   ?= runs

.PHONY: demo test test-fast lint format bench clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: install, then run the main job on the embedded default.
demo: $(STAMP)
	$(BIN)/python -m parti.device_check --gin_file=gin/runs/device_check.gin \
	  --gin.MODEL_DIR=$(RUNS)/device_check

## test: install, then lint and run the whole test suite.
test: $(STAMP) lint
	$(BIN)/python -m pytest

## test-fast: the suite without tests marked slow.
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -m 'not slow'

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: every benchmark under bench/, printing its figures.
bench: $(STAMP)
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
