# eventlake: the two commands are `make demo` and `make test`.
# Everything they need is installed here, into .venv, from pinned versions.
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(VENV)/bin/pip
STAMP   := $(VENV)/.eventlake-installed
PYTEST_ARGS ?=

.PHONY: install prism demo test test-fast bench clean lake-clean

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade "pip>=24"
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Prism, Beam's local streaming runner, built from the Go module proxy (no GitHub).
prism: install
	$(PY) -m runners.prism build

demo: install prism
	$(PY) -m runners.demo

test: install prism
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install prism
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

lake-clean:
	rm -rf lake
