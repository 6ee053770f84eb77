# med3dvlm -- every target sets itself up on a fresh machine (idempotent).
# Uses a virtual environment in .venv; point VENV elsewhere to reuse one (e.g. with a CUDA torch).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.med3dvlm-installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-offline}
# CPU torch from the local wheel cache; a GPU machine installs its own CUDA torch into $(VENV) first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: help install nltk-data browser demo test test-fast eval bench gpu-check lint clean app
NLTK_DATA_DIR := data/nltk_data
WORDNET := /usr/share/wordnet/index.sense

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install torch, the project and its test tools (once)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# constraints.txt: the exact versions CI runs with (a GPU torch installed first is kept).
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,scans,eval,app]"
	touch $(STAMP)

nltk-data: $(NLTK_DATA_DIR)/.complete ## offline WordNet 3.0 + punkt for METEOR (Debian wordnet-base)

$(NLTK_DATA_DIR)/.complete: | $(STAMP)
	test -f $(WORDNET) || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base wordnet-sense-index >/dev/null; } \
		|| { echo "METEOR needs WordNet: sudo apt-get install wordnet-base wordnet-sense-index" >&2; exit 1; }
	$(PY) -m med3dvlm.metrics.nltk_setup --out $(NLTK_DATA_DIR)
	touch $@

browser: ## Debian's chromium + chromium-driver for the app's browser test
	command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
		|| { echo "the app's browser test needs: sudo apt-get install chromium chromium-driver" >&2; exit 1; }

demo: install nltk-data ## the whole chain offline on CPU on synthetic data
	$(OFFLINE) $(PY) -m med3dvlm.demo

# One pytest-xdist worker per core, at most 4; each test file stays in one worker (its fixtures are built
# once), in the order tests/conftest.py gives (the long files first).
TEST_WORKERS ?= $(shell python3 -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)
test: install nltk-data browser ## the test suite (CPU, offline)
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install nltk-data ## the test suite without tests marked slow
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

EVAL_DIR ?= outputs/evaluate/$(shell date +%Y-%m-%d_%H-%M-%S)
# Without MODEL: the newest demo model (make demo) on the demo data.
EVAL_MODEL = $(or $(MODEL),$(patsubst %/record.json,%,$(lastword $(sort $(wildcard outputs/demo/*/model/record.json)))))
EVAL_DATA = $(or $(DATA),$(if $(MODEL),,data/demo/prepared))
eval: install nltk-data ## closed + open VQA of MODEL=<export folder> (default: newest demo model) [DATA=<prepared folder>]
	@test -n "$(EVAL_MODEL)" || { echo "usage: make eval MODEL=<export folder> [DATA=data/M3D/prepared] [EVAL_ARGS=...] (no demo model yet: make demo)" >&2; exit 2; }
	$(OFFLINE) $(PY) -m med3dvlm.evaluate task=vqa_closed model=$(EVAL_MODEL) $(if $(EVAL_DATA),data_dir=$(EVAL_DATA)) hydra.run.dir=$(EVAL_DIR) $(EVAL_ARGS)
	$(OFFLINE) $(PY) -m med3dvlm.evaluate task=vqa_open model=$(EVAL_MODEL) $(if $(EVAL_DATA),data_dir=$(EVAL_DATA)) hydra.run.dir=$(EVAL_DIR) $(EVAL_ARGS)

bench: install ## measure loader, encoder, projector, loss, stage steps and generation here
	$(OFFLINE) $(PY) -m med3dvlm.bench $(if $(REFERENCE),--reference $(REFERENCE))

app: install ## serve the web page for the demo model (python -m med3dvlm.app; MODEL=folder for another)
	$(OFFLINE) $(PY) -m med3dvlm.app model=$(or $(MODEL),$(EVAL_MODEL)) volumes_dir=data/demo/prepared

gpu-check: install ## a few FSDP+bf16 steps of each stage at paper shapes on one GPU: step time, samples/s, memory
	$(OFFLINE) $(PY) -m med3dvlm.gpu_check $(if $(REFERENCE),--reference $(REFERENCE)) $(GPU_CHECK_ARGS)

lint: install ## ruff (rules and formatting) and the import layers (lint-imports)
	$(PY) -m ruff check med3dvlm tests
	$(PY) -m ruff format --check med3dvlm tests
	$(VENV)/bin/lint-imports

clean: ## remove caches and run outputs (keeps data/ and .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
