# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
# Both create .venv, install the torch pin from requirements/torch.txt first (an unpinned torch
# can pull a different multi-GB build; transformers' PixtralProcessor needs a torchvision that
# imports beside it), then the package with its extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install lint clean chromium

run: $(STAMP)
	$(BIN)/vlmlab serve

test: $(STAMP) chromium
	$(BIN)/lint-imports
	$(BIN)/pytest -q

# HTML reports are checked in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

install: $(STAMP)

$(STAMP): pyproject.toml requirements/torch.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/torch.txt
	$(BIN)/pip install -q -e ".[hf,server,test]"
	touch $(STAMP)

clean:
	rm -rf $(VENV)
