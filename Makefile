# Two commands set up a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
STUBS := server/generated/.built

.PHONY: run test lint unit bootstrap stubs train package serve bench reliability image-test clean

bootstrap: $(INSTALLED) $(STUBS)

$(INSTALLED): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

$(STUBS): $(INSTALLED) $(wildcard proto/*.proto) proto/build.py
	$(PY) proto/build.py

# Train the demo model if no archive exists, package it, serve it in the foreground.
run: bootstrap
	$(VENV)/bin/gradserve run --config gradserve.yaml

lint: bootstrap
	$(PY) -m ruff check .

# tests/client uses tritonclient, whose generated `inference` protos cannot share a process with ours.
test: lint
	$(PY) -m pytest -q -p no:cacheprovider
	$(PY) -m pytest -q -p no:cacheprovider tests/client

bench: bootstrap
	$(VENV)/bin/gradserve bench --config gradserve.yaml

clean:
	rm -rf runs model_store/*.mar server/generated
