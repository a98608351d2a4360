# Every command creates .venv and installs the requirements first, so each works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	touch $@

lint: setup
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

# The whole method on toy data: toy datasets, synthetic DUTSv2 flows, both training stages, all test sets.
demo: setup
	$(PY) -m tools.toy_demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache toy_demo bench_results
