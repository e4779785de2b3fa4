# Two entry points, each doing its own set-up on a fresh machine (Python 3.11, CPU, no network but PyPI):
#   make demo   - create .venv, install, run the main job (`memsep demo`) on the embedded digits data
#   make test   - create .venv, install, lint (make quality), wheel smoke test (make smoke), the test suite
# The CPU torch wheel is installed FIRST: a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo quality smoke test bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/memsep demo --output_dir outputs/demo

quality: $(STAMP)
	$(BIN)/ruff check .

# The wheel installed NON-editable in a fresh venv, used from outside the checkout (scripts/wheel_smoke.py).
smoke: $(STAMP)
	TORCH_SPEC="$(TORCH_SPEC)" $(BIN)/python scripts/wheel_smoke.py

test: quality smoke
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) outputs .pytest_cache
