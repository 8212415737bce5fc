# Two commands: `make demo` (the main job) and `make test` (the whole suite). Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e '.[test]'
	@# the benchmarks' dataset (Debian package); best effort: the tests skip what needs it
	@test -d $(FASHION) || { (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: could not install dataset-fashion-mnist (needs root and Debian); benchmarks need it"; }
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/regprune demo --out runs/demo --overwrite

test: setup
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
