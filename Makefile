# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv from requirements/lock.txt: every package (the extras hf, server and test, and
# the torch + torchvision pin of requirements/torch.txt) at the version CI tested, checked against
# the lock's hashes. Then vlmlab itself, editable, with no dependency resolution of its own.
# llama-cpp-python (the llamacpp engine's tests) builds llama.cpp from source the first time (about
# 10 CPU-minutes), portable (no -march=native), and pip's wheel cache keeps the wheel after that.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LATEST ?= .venv-latest

.PHONY: run test install lock test-latest lint clean chromium

run: $(STAMP)
	$(BIN)/vlmlab serve

test: $(STAMP) chromium
	@if command -v npm >/dev/null && [ -f package-lock.json ]; then npm ci --silent || echo "npm ci failed: tests/test_playground.py skips its axe-core check"; fi
	$(BIN)/lint-imports
	$(BIN)/pytest -q

# HTML reports and pages are checked in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

install: $(STAMP)

# --no-build-isolation: the editable install builds with the lock's setuptools, not whatever
# setuptools is newest today.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install -q --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Re-resolve the lock and the optional extras' constraint files (scripts/lock.py says how);
# `make lock UPGRADE=1` moves every package to its newest release.
lock: $(STAMP)
	$(BIN)/python scripts/lock.py $(if $(UPGRADE),--upgrade)

# The suite on the newest releases of everything, in a separate venv: drift shows up here first,
# while `make test` keeps installing the lock. (On this project's machines pip is capped at the
# torch release that lies on disk.)
test-latest: chromium
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q --upgrade torch torchvision
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[hf,server,test]"
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/freeze.txt
	$(LATEST)/bin/lint-imports
	$(LATEST)/bin/pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(LATEST)
