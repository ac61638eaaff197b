# Two commands set up a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The install stamp names the hash of the files that pin the environment: a change to either reinstalls.
INSTALLED := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STUBS := server/generated/.built

.PHONY: run test lint bootstrap archive bench reliability image-test clean browser

bootstrap: $(INSTALLED) $(STUBS)

$(INSTALLED):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

$(STUBS): $(INSTALLED) $(wildcard proto/*.proto) proto/build.py
	$(PY) proto/build.py

# Train the demo model if no archive exists, package it, serve it in the foreground.
run: bootstrap
	$(VENV)/bin/gradserve run --config gradserve.yaml $(RUN_ARGS)

lint: bootstrap
	$(PY) -m ruff check .

# tests/client uses tritonclient, whose generated `inference` protos cannot share a process with ours.
# tests/test_docs_browser.py renders /docs in a real headless Chromium (`make browser` installs Debian's).
test: lint browser
	$(PY) -m pytest -q -p no:cacheprovider
	$(PY) -m pytest -q -p no:cacheprovider tests/client

# The long reliability suite (minutes of soak, thousands of fuzzed requests); `make test` runs short versions.
reliability: bootstrap
	GRADSERVE_RELIABILITY=long $(PY) -m pytest -q -p no:cacheprovider tests/reliability
	$(PY) tests/reliability/report.py --mode long

# Every way into the demo and the examples' models (their archives are trained and packaged when missing);
# BENCH_ARGS adds flags, e.g. BENCH_ARGS="--quick --peers mlserver,kserve,triton".
bench: bootstrap
	test -f runs/digits/selection.json || $(MAKE) archive
	$(VENV)/bin/gradserve bench --config gradserve.yaml $(BENCH_ARGS)

# One venv per peer server for `gradserve bench --peers` (bench/.peers/<peer>/, git-ignored, pinned in
# bench/peers/requirements-<peer>.txt; about 1.3 GB each). Not part of `make test`.
PEERS := mlserver kserve triton
.PHONY: bench-peers
bench-peers: $(PEERS:%=bench/.peers/%/.installed)

bench/.peers/%/.installed: bench/peers/requirements-%.txt
	rm -rf bench/.peers/$*
	$(PYTHON) -m venv bench/.peers/$*
	bench/.peers/$*/bin/pip install -q --disable-pip-version-check -r $<
	touch $@

# The checkpoint rule measured on every shipped data set, early stopping on and off (docs/study/; ~20-30 min on
# 2 cores, finished runs reused on the next call). Not part of `make test`.
.PHONY: study
study: bootstrap
	$(VENV)/bin/gradserve study --suite docs/study/suite.yaml --no-progress

# Build the container image with podman (installed if missing), run it, check gRPC and REST predictions.
image-test: bootstrap
	test -n "$$(ls model_store/*.mar 2>/dev/null)" || $(MAKE) archive
	bash scripts/image_test.sh

# Train and package the demo model (what `make run` does before serving).
archive: bootstrap
	$(VENV)/bin/gradserve train --config gradserve.yaml
	$(VENV)/bin/gradserve package --run runs/digits --force

# Debian's Chromium, for the headless-browser test of /docs (as root, or with sudo).
browser:
	@command -v chromium >/dev/null || { test "$$(id -u)" = 0 && SUDO= || SUDO=sudo; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf runs model_store/*.mar server/generated
