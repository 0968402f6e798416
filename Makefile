# Two entry points for a fresh machine; each creates .venv in the repository root on first use.
#   make demo   - the whole system on the embedded default with a simulated fleet and riders
#   make test   - the whole test suite (starts local PostgreSQL, Redis, Mosquitto if stopped)
VENV := .venv
PYTHON := $(VENV)/bin/python
DEMO_ARGS ?= --duration 60
TEST_ARGS ?=

.PHONY: demo test venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet --editable '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/powerbank demo $(DEMO_ARGS)

test: $(VENV)/.installed
	bash .ci/services
	$(PYTHON) -m pytest $(TEST_ARGS)
