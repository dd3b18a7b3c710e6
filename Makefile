# Every target that needs Python creates .venv and installs the project first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help

##@ Use

demo: $(STAMP) ## Run a workload on a local Dask cluster with the plugin and show what was stored
	$(VENV)/bin/metadata-pipeline demo

##@ Develop

test: $(STAMP) ## Run the whole test suite
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) ## Run the performance suite and print its table
	$(PY) -m benchmarks

lint: $(STAMP) ## Lint, format check and type check
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(VENV)/bin/ruff format --check pipeline tests benchmarks
	$(VENV)/bin/mypy pipeline

venv: $(STAMP) ## Create .venv and install the project with its test extra

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

##@ Help

help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} \
	  /^[a-zA-Z_-]+:.*?##/ { printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

.PHONY: demo test bench lint venv clean help
