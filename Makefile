# Two commands on a fresh machine: `make demo` and `make test`. The venv is made on first use,
# with the CPU build of torch 2.13.0 installed first so that no multi-GB CUDA build is pulled.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow data docs clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/python -m robustcl.data.fetch fashion-mnist

demo: $(STAMP) data
	$(BIN)/robustcl demo

# lint-imports: the layer contract (.importlinter, docs/architecture.md) is the first gate
test: $(STAMP) data
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

test-slow: $(STAMP) data
	$(BIN)/python -m pytest -q -m slow

# The documentation site into site/; --strict: any warning (a broken link, a bad docstring) fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

clean-venv:
	rm -rf $(VENV)
