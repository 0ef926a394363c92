# aquin_nb: `make demo` runs the main job offline, `make test` runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.aquin-installed
# The CPU wheel of torch first: a plain `torch` requirement pulls a multi-GB CUDA
# build. pyproject keeps torch's range open for GPU users.
TORCH_CPU ?= torch==2.13.0

.PHONY: env demo test lint typecheck browser-deps artifacts bench bench-gpu clean

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_CPU)
	$(PY) -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $@

demo: $(STAMP)
	$(VENV)/bin/aquin-nb demo --out demo_out

lint: $(STAMP)
	$(PY) -m ruff check aquin_nb tests benchmarks notebooks
	$(PY) -m ruff format --check aquin_nb tests benchmarks notebooks

typecheck: $(STAMP)
	$(PY) -m mypy

# Browser tests drive Debian's chromium through Playwright (its own download
# does not work offline); install it when it is missing.
# JupyterLab's own HTML sanitizer (npm) checks how a card degrades in an untrusted notebook.
JLAB_SANITIZER := tests/browser/.jupyterlab
browser-deps:
	command -v chromium >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	command -v npm >/dev/null 2>&1 || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	test -d $(JLAB_SANITIZER)/node_modules/@jupyterlab/apputils || \
	  npm install --silent --no-audit --no-fund --prefix $(JLAB_SANITIZER) @jupyterlab/apputils@4.7.6

test: lint typecheck browser-deps
	$(PY) -m pytest -q

artifacts: $(STAMP)
	$(PY) -m aquin_nb.demo.build

bench: $(STAMP)
	$(PY) benchmarks/diff.py
	$(PY) benchmarks/align.py
	$(PY) benchmarks/mirror.py

# The diff and align benchmarks on CUDA in bfloat16 (needs a CUDA build of torch).
bench-gpu: $(STAMP)
	PYTHON=$(PY) bash benchmarks/gpu.sh

clean:
	rm -rf demo_out .pytest_cache .mypy_cache .ruff_cache
