# Two commands on a fresh machine: `make serve` (install what serving needs, then run the server) and
# `make test` (install the test tools too, then run the tests). Each install runs once per pyproject.toml
# version (a stamp file in .venv); `make serve ARGS="--api-key sk-my-key-123"` passes flags to the server.
PYTHON ?= python3
VENV := .venv
HASH := $(shell cksum pyproject.toml | cut -d' ' -f1)
SERVE_STAMP := $(VENV)/.installed-serve-$(HASH)
DEV_STAMP := $(VENV)/.installed-dev-$(HASH)
ARGS ?=

.PHONY: install install-dev serve demo test bench-engine clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# Serving only: torch, transformers, FastAPI, ... (no Ray, test or plotting tools).
$(SERVE_STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e .
	rm -f $(VENV)/.installed-serve-* && touch $@

# Everything the tests use (Ray, pytest, openai, hypothesis, schemathesis, matplotlib); includes serving.
$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-dev-* $(VENV)/.installed-serve-* && touch $@ $(SERVE_STAMP)

install: $(SERVE_STAMP)

install-dev: $(DEV_STAMP)

serve: $(SERVE_STAMP)
	$(VENV)/bin/faasmoe serve $(ARGS)

demo: $(SERVE_STAMP)
	test -f models/tiny/config.json || $(VENV)/bin/faasmoe init-model --preset tiny --out models/tiny
	@echo "models/tiny has RANDOM weights (faasmoe init-model): expect gibberish text, see README 'Models' for a real one"
	$(VENV)/bin/faasmoe generate --model models/tiny --prompt "Mixture of experts on functions" --max-tokens 16

test: $(DEV_STAMP)
	$(VENV)/bin/pytest $(ARGS)

bench-engine: $(SERVE_STAMP)
	$(VENV)/bin/faasmoe bench-engine -k 1 -k 4 -k 60 --out runs/bench-engine.json

clean:
	rm -rf $(VENV) runs .pytest_cache
