# Two commands on a fresh machine: `make serve` (install, then run the server) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install serve demo test bench-engine clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/faasmoe serve

demo: $(STAMP)
	test -f models/tiny/config.json || $(VENV)/bin/faasmoe init-model --preset tiny --out models/tiny
	$(VENV)/bin/faasmoe generate --model models/tiny --prompt "Mixture of experts on functions" --max-tokens 16

test: $(STAMP)
	$(VENV)/bin/pytest

bench-engine: $(STAMP)
	$(VENV)/bin/faasmoe bench-engine -k 1 -k 4 -k 60 --out runs/bench-engine.json

clean:
	rm -rf $(VENV) runs .pytest_cache
