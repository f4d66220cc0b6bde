# Quick start: `make demo` (the main job) and `make test`. Each installs what it needs first.
# The CPU build of torch is pinned on this path; a GPU user overrides it, e.g.
#   make test TORCH_SPEC="torch"            (whatever CUDA build pip picks)
#   make install TORCH_SPEC="torch==2.13.0" PIP_EXTRA="--index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install demo test docs lint bench-overhead clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile scripts/fetch_datasets.py | $(PY)
	$(PIP) install --quiet --disable-pip-version-check "$(TORCH_SPEC)" $(PIP_EXTRA)
	$(PIP) install --quiet --disable-pip-version-check -e ".[dev,cli,plots,datasets,paper,features,lightning,accelerate,tensorboard,docs]"
	$(PY) scripts/fetch_datasets.py
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/cggm demo

test: install
	$(PY) -m pytest -q

# the documentation site, strictly (a broken link or reference fails it), into site/;
# `$(VENV)/bin/mkdocs serve` to browse it while editing docs/
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: install
	$(PY) -m ruff check src tests benchmarks

bench-overhead: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) demo_output runs .pytest_cache site
