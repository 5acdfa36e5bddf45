# The two Quickstart commands (`make demo`, `make test`) create .venv and
# install the project into it on first use; later runs reuse it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNS   ?= runs

.PHONY: demo demo-long device-check test test-fast browser lint format bench bench-peer clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: install, then run the end-to-end demo on the shapes (parti.demo: data,
## vocabulary, tokenizer, pre-encoding, Parti, inference, evaluation); reruns resume.
demo: $(STAMP)
	$(BIN)/python -m parti.demo --runs_dir=$(RUNS)/demo

## demo-long: the same stages on 100k scenes, trained longer (6000 tokenizer and 20000 Parti steps), plus
## fine-tuning Parti for editing and the super-resolution stage (the upsampler trained
## 48 -> 192 px; inference writes both sizes).
demo-long: $(STAMP)
	$(BIN)/python -m parti.demo --runs_dir=$(RUNS)/demo_long --long

## device-check: the devices, the mesh, a sharded matmul and the matmul peak.
device-check: $(STAMP)
	$(BIN)/python -m parti.device_check --gin_file=gin/runs/device_check.gin \
	  --gin.MODEL_DIR=$(RUNS)/device_check

## test: install, then lint and run the whole test suite, a worker per core (pytest-xdist;
## each test file runs on one worker, so its module fixtures are made once, and the files that share
## the trained tokenizer on one worker together: see tests/conftest.py). As root on Debian it also
## installs chromium and chromedriver (Debian's packages) for the rating app's browser test.
test: $(STAMP) browser lint
	$(BIN)/python -m pytest -n auto --dist loadgroup

browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's chromium and chromium-driver for the browser test"; \
	  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null \
	  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
	       chromium chromium-driver >/dev/null; }; \
	else echo "No chromium/chromedriver and not root on Debian: the browser test is skipped" \
	  "(apt-get install chromium chromium-driver)."; fi

## test-fast: the suite without tests marked slow.
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -m 'not slow'

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: every benchmark under bench/, printing its figures. The inference job's
## runs on the demo's model (make demo first) with PARTI_PROMPTS=path/to/PartiPrompts.tsv.
bench: $(STAMP)
	for b in bench/*.py; do \
	  [ $$b = bench/infer_parti_prompts.py ] && continue; \
	  echo "== $$b"; $(BIN)/python $$b || exit 1; \
	done
	@if [ -n "$(PARTI_PROMPTS)" ]; then \
	  echo "== bench/infer_parti_prompts.py"; \
	  $(BIN)/python bench/infer_parti_prompts.py --prompts=$(PARTI_PROMPTS); \
	else echo "== bench/infer_parti_prompts.py skipped: pass PARTI_PROMPTS=path/to/PartiPrompts.tsv"; fi

## bench-peer: the training and sampling benches with parti-pytorch measured beside
## ours in the same run (installs the `peer` extra: torch, about 5.5 GB).
bench-peer: $(STAMP)
	$(BIN)/pip install -q -e '.[peer]'
	$(BIN)/python bench/parti_train_throughput.py
	$(BIN)/python bench/sampling_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
