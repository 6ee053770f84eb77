# med3dvlm -- every target sets itself up on a fresh machine (idempotent).
# Uses a virtual environment in .venv; point VENV elsewhere to reuse one (e.g. with a CUDA torch).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.med3dvlm-installed
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=$${WANDB_MODE:-offline}
# CPU torch from the local wheel cache; a GPU machine installs its own CUDA torch into $(VENV) first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: help install demo test test-fast eval bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install torch, the project and its test tools (once)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: install ## the whole chain offline on CPU on synthetic data
	$(OFFLINE) $(PY) -m med3dvlm.demo

test: install ## the test suite (CPU, offline)
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q

test-fast: install ## the test suite without tests marked slow
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q -m "not slow"

eval: install ## VQA scoring (closed + open) of MODEL=<export folder>
	@echo "evaluation is not implemented yet (see the open issue 'Evaluation'); nothing was run" >&2; exit 2

bench: install ## measure loader, encoder, projector and loss on this machine
	$(OFFLINE) $(PY) -m med3dvlm.bench

lint: install ## ruff
	$(PY) -m ruff check med3dvlm tests

clean: ## remove caches and run outputs (keeps data/ and .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
