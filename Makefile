# Two commands: `make demo` (set up + run the default pipeline on the CPU) and `make test`.
# TORCH picks the PyTorch build: the default installs the CPU build 2.13.0 first so that
# nothing pulls the CUDA wheels; on a GPU machine use `make demo TORCH=torch` (or any spec).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
RUN_DIR ?= runs/demo
SEED ?= 0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1

.PHONY: setup browser demo test test-slow lint clean

setup: $(VENV)/.installed browser

# optional: headless Chromium for tests/test_browser.py (skipped without it); never fails
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
	  echo "make browser: chromium not installed (needs apt-get as root); tests/test_browser.py will skip"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/rlhf-toy pipeline --output_dir $(RUN_DIR) --seed $(SEED) --overwrite_output_dir

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no test is marked slow

lint: setup
	$(BIN)/ruff check rlhf_toy tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
